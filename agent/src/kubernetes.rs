//! The agent's Kubernetes side: keeps the index of this node's pods current (for the insight
//! metrics' names), and applies the `PrePull` resources whose selector picks this node — one
//! pre-pull policy per resource, with credentials from exactly the secrets it names — and
//! reports each outcome once as an Event regarding the resource, from this node.
//!
//! Decisions are the core's ([`crate::core::prepulls`], [`crate::core::pods`]); the API is
//! [`crate::adapters::kube`]. The agent writes only Events, never a `PrePull`, so the number of
//! nodes does not contend on any shared object.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    adapters::{
        error_chain,
        kube::{
            Change, Events, NodeFacts, pull_credentials, watch_node, watch_pods, watch_prepulls,
        },
        registry::{Registry, normalize},
    },
    config::{KubeSettings, PrepullPolicy},
    core::{
        pods::Index,
        prepulls::{Decision, Notice, Outcome, Reporter, Resource, decide},
    },
    metrics::{KubeMetrics, PrepullMetrics},
};

/// How often applied resources are looked at again without a change from the API (a pull
/// secret created after its resource, a secret that could not be read).
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

/// What the Kubernetes side needs besides the client.
pub struct Options {
    pub settings: KubeSettings,
    pub socket: PathBuf,
    pub namespace: String,
    /// The `[prepull]` settings every resource's policy uses (its images are not these).
    pub prepull: PrepullPolicy,
    pub reconcile_interval: Duration,
    /// Where the Node's capacity (cores, bytes) is published for the instance-shape advice.
    pub node_capacity: Arc<RwLock<Option<(f64, u64)>>>,
    /// Layer sharing for the PrePull resources' pulls (None: straight from the registry).
    pub mesh: Option<Arc<crate::sharing::NodeMesh>>,
}

/// Runs until `stop` turns true.
pub async fn run(
    client: Client,
    opts: Options,
    pods: Arc<RwLock<Index>>,
    metrics: KubeMetrics,
    prepull_metrics: PrepullMetrics,
    stop: watch::Receiver<bool>,
) {
    info!(node = %opts.settings.node_name, "watching this node's pods and the PrePull resources");
    let up = Arc::new(Up::new(metrics.up.clone()));
    let pod_task = tokio::spawn(keep_pods(
        client.clone(),
        opts.settings.node_name.clone(),
        pods,
        metrics.clone(),
        up.clone(),
        stop.clone(),
    ));
    let mut applier = Applier::new(client, opts, metrics, prepull_metrics, up);
    applier.run(stop).await;
    if let Err(e) = pod_task.await {
        warn!(error = %e, "the pod watch ended abnormally");
    }
}

/// `ragent_kube_up`: 1 once every watch has listed, 0 while any is failing.
struct Up {
    gauge: prometheus::IntGauge,
    /// Per watch: listed and not failing since.
    ok: std::sync::Mutex<BTreeMap<&'static str, bool>>,
}

impl Up {
    fn new(gauge: prometheus::IntGauge) -> Up {
        gauge.set(0);
        Up {
            gauge,
            ok: std::sync::Mutex::new(
                ["pods", "nodes", "prepulls"]
                    .into_iter()
                    .map(|w| (w, false))
                    .collect(),
            ),
        }
    }

    fn set(&self, watch: &'static str, ok: bool) {
        let mut m = match self.ok.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        m.insert(watch, ok);
        self.gauge.set(i64::from(m.values().all(|v| *v)));
    }
}

async fn keep_pods(
    client: Client,
    node: String,
    index: Arc<RwLock<Index>>,
    metrics: KubeMetrics,
    up: Arc<Up>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stream = watch_pods(client, &node);
    loop {
        let item = tokio::select! {
            i = stream.next() => i,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(item) = item else { return };
        let mut ix = match index.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match item {
            Ok(Change::Apply(p)) => ix.apply(p),
            Ok(Change::Delete(p)) => ix.delete(&p.uid),
            Ok(Change::Relist) => ix.relist_begin(),
            Ok(Change::Listed(p)) => ix.relist_item(p),
            Ok(Change::ListDone) => {
                ix.relist_done();
                up.set("pods", true);
            }
            Err(e) => {
                metrics.watch_errors.with_label_values(&["pods"]).inc();
                up.set("pods", false);
                warn!(error = %error_chain(&e), "pod watch failed; retrying with backoff");
            }
        }
        metrics
            .pods
            .set(i64::try_from(ix.len()).unwrap_or(i64::MAX));
    }
}

enum Step {
    Stop,
    /// Whether something changed that may change a decision.
    Reconcile(bool),
    Outcome((String, String, Outcome)),
}

/// One resource's running policy.
struct Applied {
    generation: i64,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Applier {
    client: Client,
    opts: Options,
    metrics: KubeMetrics,
    prepull_metrics: PrepullMetrics,
    up: Arc<Up>,
    events: Events,
    reporter: Reporter,
    resources: BTreeMap<String, (Resource, ObjectReference)>,
    /// A relist of the resources in progress.
    relist: Option<BTreeMap<String, (Resource, ObjectReference)>>,
    /// None until the node has been read: nothing is decided before.
    labels: Option<BTreeMap<String, String>>,
    running: HashMap<String, Applied>,
    outcomes_tx: mpsc::UnboundedSender<(String, String, Outcome)>,
    outcomes_rx: mpsc::UnboundedReceiver<(String, String, Outcome)>,
}

impl Applier {
    fn new(
        client: Client,
        opts: Options,
        metrics: KubeMetrics,
        prepull_metrics: PrepullMetrics,
        up: Arc<Up>,
    ) -> Applier {
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        Applier {
            events: Events::new(client.clone(), &opts.settings.node_name),
            client,
            opts,
            metrics,
            prepull_metrics,
            up,
            reporter: Reporter::default(),
            resources: BTreeMap::new(),
            relist: None,
            labels: None,
            running: HashMap::new(),
            outcomes_tx,
            outcomes_rx,
        }
    }

    async fn run(&mut self, mut stop: watch::Receiver<bool>) {
        let mut nodes = watch_node(self.client.clone(), &self.opts.settings.node_name);
        let mut prepulls = watch_prepulls(self.client.clone());
        let mut tick = tokio::time::interval(self.opts.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Nothing awaits inside the select (a borrowed watch value must not cross one).
            let step = tokio::select! {
                _ = stop.wait_for(|s| *s) => Step::Stop,
                Some(item) = nodes.next() => Step::Reconcile(self.node_changed(item)),
                Some(item) = prepulls.next() => Step::Reconcile(self.resources_changed(item)),
                Some(o) = self.outcomes_rx.recv() => Step::Outcome(o),
                _ = tick.tick() => Step::Reconcile(true),
            };
            match step {
                Step::Stop => break,
                Step::Reconcile(true) => self.reconcile().await,
                Step::Reconcile(false) => {}
                Step::Outcome((resource, image, outcome)) => {
                    // A policy of a resource that has since gone or changed may still report.
                    if self.running.contains_key(&resource)
                        && let Some(n) = self.reporter.outcome(&resource, &image, outcome)
                    {
                        self.publish(n).await;
                    }
                }
            }
        }
        for (_, a) in self.running.drain() {
            let _ = a.stop.send(true);
            let _ = a.task.await;
        }
    }

    /// True when the node's labels may have changed.
    fn node_changed(
        &mut self,
        item: Result<Change<NodeFacts>, crate::adapters::kube::KubeError>,
    ) -> bool {
        match item {
            Ok(Change::Apply(n)) | Ok(Change::Listed(n)) => {
                if let Some(c) = n.capacity {
                    match self.opts.node_capacity.write() {
                        Ok(mut g) => *g = Some(c),
                        Err(p) => *p.into_inner() = Some(c),
                    }
                }
                self.labels = Some(n.labels);
                true
            }
            Ok(Change::ListDone) => {
                self.up.set("nodes", true);
                self.labels.get_or_insert_default();
                true
            }
            Ok(Change::Relist) => false,
            Ok(Change::Delete(_)) => {
                warn!(node = %self.opts.settings.node_name, "this node's object was deleted");
                false
            }
            Err(e) => {
                self.metrics
                    .watch_errors
                    .with_label_values(&["nodes"])
                    .inc();
                self.up.set("nodes", false);
                warn!(error = %error_chain(&e), "node watch failed; retrying with backoff");
                false
            }
        }
    }

    /// True when the set of resources may have changed.
    fn resources_changed(
        &mut self,
        item: Result<Change<(Resource, ObjectReference)>, crate::adapters::kube::KubeError>,
    ) -> bool {
        match item {
            Ok(Change::Apply(r)) => {
                self.resources.insert(r.0.name.clone(), r);
                true
            }
            Ok(Change::Delete(r)) => {
                self.resources.remove(&r.0.name);
                true
            }
            Ok(Change::Relist) => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Ok(Change::Listed(r)) => {
                match &mut self.relist {
                    Some(m) => {
                        m.insert(r.0.name.clone(), r);
                    }
                    None => {
                        self.resources.insert(r.0.name.clone(), r);
                    }
                }
                false
            }
            Ok(Change::ListDone) => {
                if let Some(m) = self.relist.take() {
                    self.resources = m;
                }
                self.up.set("prepulls", true);
                true
            }
            Err(e) => {
                self.metrics
                    .watch_errors
                    .with_label_values(&["prepulls"])
                    .inc();
                self.up.set("prepulls", false);
                warn!(error = %error_chain(&e), "PrePull watch failed; retrying with backoff");
                false
            }
        }
    }

    async fn reconcile(&mut self) {
        let Some(labels) = self.labels.clone() else {
            return;
        };
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|n| !self.resources.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.stop(&name).await;
            info!(prepull = %name, "PrePull deleted: its policy stops (images stay on the node)");
        }
        let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
        let resources: Vec<(Resource, ObjectReference)> =
            self.resources.values().cloned().collect();
        for (r, oref) in resources {
            let mut d = decide(&r, &labels, &self.opts.settings.pull_secret_namespaces);
            match &d {
                Decision::Apply => {
                    let current = self
                        .running
                        .get(&r.name)
                        .is_some_and(|a| a.generation == r.generation && !a.task.is_finished());
                    if !current {
                        self.stop(&r.name).await;
                        if let Err(reason) = self.start(&r, &oref).await {
                            d = Decision::Refused { reason };
                        }
                    }
                }
                Decision::NotSelected => {
                    if self.running.contains_key(&r.name) {
                        self.stop(&r.name).await;
                        info!(prepull = %r.name, "PrePull no longer selects this node");
                    }
                    self.reporter.forget(&r.name);
                }
                Decision::Refused { .. } => self.stop(&r.name).await,
            }
            if let Decision::Refused { reason } = &d
                && let Some(n) = self.reporter.refused(&r.name, reason)
            {
                warn!(prepull = %r.name, %reason, "PrePull refused on this node");
                self.publish_about(n, &oref).await;
            }
            *counts.entry(d.metric_label()).or_default() += 1;
        }
        for state in ["applied", "not_selected", "refused"] {
            self.metrics
                .resources
                .with_label_values(&[state])
                .set(counts.get(state).copied().unwrap_or(0));
        }
    }

    async fn stop(&mut self, name: &str) {
        if let Some(a) = self.running.remove(name) {
            let _ = a.stop.send(true);
            if let Err(e) = a.task.await {
                warn!(prepull = %name, error = %e, "a PrePull policy ended abnormally");
            }
        }
    }

    /// Starts the resource's policy; `Err` is why it cannot run (a secret that cannot be read,
    /// no valid image). Invalid references are reported and left out.
    async fn start(&mut self, r: &Resource, oref: &ObjectReference) -> Result<(), String> {
        let credentials = pull_credentials(&self.client, &r.secrets)
            .await
            .map_err(|e| {
                format!(
                    "{}; none of its images are pulled (looked at again every {} s)",
                    error_chain(&e),
                    self.opts.reconcile_interval.as_secs()
                )
            })?;
        let mut images = Vec::new();
        for i in &r.images {
            match normalize(i) {
                Ok(n) => images.push(n),
                Err(e) => {
                    let o = Outcome::Failed {
                        reason: error_chain(&e),
                    };
                    if let Some(n) = self.reporter.outcome(&r.name, i, o) {
                        self.publish_about(n, oref).await;
                    }
                }
            }
        }
        if images.is_empty() {
            return Err("no valid image reference in spec.images".into());
        }
        let mut policy = self.opts.prepull.clone();
        policy.images = images;
        policy.credentials = credentials.clone();
        if let Some(refresh) = r.refresh {
            policy.timing.refresh = Some(refresh);
        }
        let registry = Arc::new(Registry::new(&policy.insecure_registries, credentials));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Outcome)>();
        let to_applier = self.outcomes_tx.clone();
        let name = r.name.clone();
        // Tags each outcome with its resource; ends when the policy drops its sender.
        tokio::spawn(async move {
            while let Some((image, o)) = rx.recv().await {
                if to_applier.send((name.clone(), image, o)).is_err() {
                    return;
                }
            }
        });
        info!(prepull = %r.name, images = policy.images.len(), secrets = r.secrets.len(), "applying PrePull");
        let task = tokio::spawn(crate::warm::keep_warm(
            self.opts.socket.clone(),
            self.opts.namespace.clone(),
            policy,
            registry,
            self.prepull_metrics.clone(),
            Some(tx),
            self.opts.mesh.clone(),
            stop_rx,
        ));
        self.running.insert(
            r.name.clone(),
            Applied {
                generation: r.generation,
                stop: stop_tx,
                task,
            },
        );
        Ok(())
    }

    async fn publish(&mut self, n: Notice) {
        let Some((_, oref)) = self.resources.get(&n.resource) else {
            return;
        };
        let oref = oref.clone();
        self.publish_about(n, &oref).await;
    }

    async fn publish_about(&mut self, n: Notice, oref: &ObjectReference) {
        match self.events.publish(&n, oref).await {
            Ok(()) => self.metrics.events.with_label_values(&["published"]).inc(),
            Err(e) => {
                self.metrics.events.with_label_values(&["failed"]).inc();
                warn!(error = %error_chain(&e), "could not publish an Event");
            }
        }
    }
}
