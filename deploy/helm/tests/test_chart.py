"""The Helm chart (deploy/helm/ragent), checked with real tools: Helm's own template engine and
linter (helm-python-sdk), the Kubernetes API schemas (kubernetes-validate --strict), and the
prometheus-operator schema and types for the ServiceMonitor (npm, monitor_check.cjs). Then the
rendered objects are read: capabilities, host mounts, RBAC, probes, the config file.

Run by `cargo xtask test` (step "== Helm chart") with the tools `cargo xtask setup` installs:
    ~/.cache/ragent/chart-tools/venv/bin/python -m unittest discover -s deploy/helm/tests -v
Environment:
    RAGENT_CHART_NODE_MODULES  node_modules with the npm packages of package.json (required)
    RAGENT_CHART_OUT           a directory to write each scenario's config.toml into (and, in
                               catalog/, the instance-type catalog it ships), for xtask's check
                               of them with ragent's own parsers (optional)
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
import tomllib
import unittest
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "ragent"
RELEASE = "ragent"
NAMESPACE = "ragent"

# The Kubernetes minor versions the README claims: every rendered manifest and CRD is validated
# against each one's API schemas, unknown fields rejected.
KUBE_VERSIONS = [f"1.{m}" for m in range(25, 38)]

# Kinds kubernetes-validate has no schema for; monitor_check.cjs checks them instead.
MONITOR_KINDS = {"ServiceMonitor", "PodMonitor"}

# What the agent needs from the kernel, and nothing else (README.md, "Capabilities").
CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN"}

# The right-sizing checkpoint directory's default: the only host directory mounted read-write.
CHECKPOINT_DIR = "/var/lib/ragent/rightsizing"
# Where a catalog from rightsizing.catalog is mounted, read-only, and the agent reads it.
CATALOG_DIR = "/etc/ragent/catalog"
CATALOG_KEY = "instance-types.toml"
# Layer sharing (sharing.enabled): where the peer token is mounted (read-only, from a Secret)
# and the spool directory (an emptyDir); certs.d is mounted read-write at sharing.certsDir.
PEER_TOKEN_DIR = "/etc/ragent/peer-token"
SPOOL_DIR = "/var/lib/ragent/spool"
# The token of the operator's Secret in scenarios with sharing.token.existingSecret, for
# xtask's check of the rendered config with ragent's parser (which reads token_file).
OPERATOR_TOKEN = "an-operator-made-peer-token-0123456789"


def load_scenarios():
    """Values to render with: the defaults, and every file in values/."""
    scenarios = {"default": {}}
    for f in sorted((HERE / "values").glob("*.yaml")):
        scenarios[f.stem] = yaml.safe_load(f.read_text()) or {}
    return scenarios


def parse_manifests(rendered):
    """Template path -> rendered text, to a list of (template, object)."""
    objects = []
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for obj in yaml.safe_load_all(text):
            if obj:
                objects.append((template, obj))
    return objects


def find(objects, kind, name=None):
    return [o for _, o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind):
    found = find(objects, kind)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}, found {len(found)}")
    return found[0]


def walk(value, path=""):
    """Every (path, key, value) of a nested object."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")


class Chart(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.chart = helm.Chart.load(str(CHART))
        cls.scenarios = load_scenarios()
        cls.rendered = {}
        cls.objects = {}
        for name, values in cls.scenarios.items():
            out = cls.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            cls.rendered[name] = out
            cls.objects[name] = parse_manifests(out)
        cls.crds = [yaml.safe_load(c["data"]) | {"__file": c["filename"]} for c in cls.chart.crds]

    @classmethod
    def tearDownClass(cls):
        cls.chart.close()

    def merged(self, scenario):
        return self.chart.merge_values(self.scenarios[scenario])

    def container(self, scenario):
        ds = one(self.objects[scenario], "DaemonSet")
        containers = ds["spec"]["template"]["spec"]["containers"]
        self.assertEqual(len(containers), 1)
        return ds["spec"]["template"]["spec"], containers[0]

    # --- Helm itself -------------------------------------------------------------------------

    def test_lint_strict(self):
        for name, values in self.scenarios.items():
            for kube in (KUBE_VERSIONS[0], KUBE_VERSIONS[-1]):
                with self.subTest(values=name, kube=kube):
                    report = helm.lint(
                        str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube}.0"
                    )
                    bad = [m for m in report["messages"] if m["severity"] >= 2]
                    self.assertEqual(report["errors"], [], report)
                    self.assertEqual(bad, [], report)

    def test_values_schema_rejects_wrong_values(self):
        wrong = {
            "a port as a string": {"agent": {"metricsPort": "9464"}},
            "an unknown top-level key": {"tolerate": [{"operator": "Exists"}]},
            "an unknown nested key": {"serviceMonitor": {"enable": True}},
            "tolerations as a string": {"tolerations": "all"},
            "hostPID as a string": {"hostPID": "yes"},
            "capabilities as a string": {"securityContext": {"capabilities": "BPF"}},
            "privileged as a string": {"securityContext": {"privileged": "false"}},
            "a namespace that is not a name": {"prepull": {"pullSecretNamespaces": ["Team_A"]}},
            "a rate without a number": {"prepull": {"maxRate": "fast"}},
            "a relative socket path": {"containerd": {"socket": "containerd.sock"}},
            "an unknown rebase mode": {"rebase": {"mode": "always"}},
            "right-sizing on as a string": {"rightsizing": {"enabled": "yes"}},
            "a sample interval as a string": {"rightsizing": {"sampleIntervalSeconds": "15"}},
            "a sample interval of 0": {"rightsizing": {"sampleIntervalSeconds": 0}},
            "a sample interval over an hour": {"rightsizing": {"sampleIntervalSeconds": 3601}},
            "a fractional checkpoint interval": {"rightsizing": {"checkpointIntervalSeconds": 2.5}},
            "a relative checkpoint directory": {"rightsizing": {"checkpointHostPath": "var/lib/ragent"}},
            "the host root as checkpoint directory": {"rightsizing": {"checkpointHostPath": "/"}},
            "a catalog that is not text": {"rightsizing": {"catalog": {"instance_type": []}}},
            "an unknown right-sizing key": {"rightsizing": {"sampleInterval": 15}},
            "an unknown headroom key": {"rightsizing": {"headroom": {"reserved_cpu": 1}}},
            "a headroom fraction as a string": {"rightsizing": {"headroom": {"fraction": "15%"}}},
            "fractional reserved bytes": {"rightsizing": {"headroom": {"system_reserved_memory_bytes": 1.5}}},
            "an unknown model key": {"rightsizing": {"model": {"target_percentile": 0.9}}},
            "a percentile above 1": {"rightsizing": {"model": {"cpu_target_percentile": 90}}},
            "a histogram ratio of 1": {"rightsizing": {"model": {"memory_histogram": {
                "first_bucket": 1048576, "ratio": 1, "max_value": 1e12, "half_life_s": 86400}}}},
            "a histogram without its layout": {"rightsizing": {"model": {"cpu_histogram": {"ratio": 1.1}}}},
            "sharing on as a string": {"sharing": {"enabled": "true"}},
            "a peer port as a string": {"sharing": {"port": "9465"}},
            "a peer port of 0": {"sharing": {"port": 0}},
            "a peer port above 65535": {"sharing": {"port": 65536}},
            "a shared registry with a scheme": {"sharing": {"registries": ["https://docker.io"]}},
            "a shared registry with a path": {"sharing": {"registries": ["docker.io/library"]}},
            "a shared registry that is not a string": {"sharing": {"registries": [5000]}},
            "a shared registry listed twice": {"sharing": {"registries": ["ghcr.io", "ghcr.io"]}},
            "shared registries as a string": {"sharing": {"registries": "docker.io"}},
            "a public prefix in upper case": {"sharing": {"public": ["docker.io/Library"]}},
            "a public entry with a scheme": {"sharing": {"public": ["https://docker.io/library"]}},
            "a public entry ending in a slash": {"sharing": {"public": ["docker.io/library/"]}},
            "a relative certs.d": {"sharing": {"certsDir": "etc/containerd/certs.d"}},
            "the host root as certs.d": {"sharing": {"certsDir": "/"}},
            "an insecure registry with a scheme": {"sharing": {"insecureRegistries": ["http://mirror:5000"]}},
            "a peer timeout under 10 ms": {"sharing": {"peerTimeoutMs": 5}},
            "a peer timeout over a minute": {"sharing": {"peerTimeoutMs": 60001}},
            "a peer timeout with a unit": {"sharing": {"peerTimeoutMs": "1s"}},
            "a keep time under a minute": {"sharing": {"keepSeconds": 59}},
            "a keep time over a week": {"sharing": {"keepSeconds": 604801}},
            "a fractional keep time": {"sharing": {"keepSeconds": 3600.5}},
            "a token given in the values": {"sharing": {"token": {"value": "0123456789abcdef0123"}}},
            "a token Secret that is not a name": {"sharing": {"token": {"existingSecret": "Peer_Token"}}},
            "an unknown sharing key": {"sharing": {"zoneAware": True}},
        }
        for what, values in wrong.items():
            with self.subTest(what):
                with self.assertRaises(helm.HelmValuesError):
                    self.chart.validate_schema(values)
                with self.assertRaises(helm.HelmValuesError):
                    self.chart.render(values, name=RELEASE, namespace=NAMESPACE)
        for name, values in self.scenarios.items():
            with self.subTest(accepted=name):
                self.chart.validate_schema(values)

    # --- the API schemas ---------------------------------------------------------------------

    def test_manifests_and_crds_validate_strictly(self):
        available = {kv_utils.major_minor(v) for v in kv_utils.all_versions()}
        self.assertTrue(set(KUBE_VERSIONS) <= available, f"kubernetes-validate has {sorted(available)}")
        to_check = [(f"{name}: {t}", o) for name, objs in self.objects.items() for t, o in objs]
        to_check += [(c["__file"], {k: v for k, v in c.items() if k != "__file"}) for c in self.crds]
        failures = []
        checked = 0
        for where, obj in to_check:
            if obj["kind"] in MONITOR_KINDS:
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                    checked += 1
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    failures.append(f"{where} {obj['kind']}/{obj['metadata']['name']} on {version}: {path}: {e.message}")
                except kv_utils.SchemaNotFoundError as e:
                    failures.append(f"{where}: {e.message}")
        print(f"\n  kubernetes-validate --strict: {checked} object validations passed "
              f"({len(to_check)} objects incl. {len(self.crds)} CRD(s), Kubernetes {KUBE_VERSIONS[0]}-{KUBE_VERSIONS[-1]})",
              file=sys.stderr)
        self.assertEqual(failures, [])

    def test_service_monitor_matches_prometheus_operator(self):
        node_modules = os.environ.get("RAGENT_CHART_NODE_MODULES")
        self.assertTrue(node_modules and Path(node_modules).is_dir(),
                        "RAGENT_CHART_NODE_MODULES must name the node_modules `cargo xtask setup` installs")
        monitors = [(name, o) for name, objs in self.objects.items() for _, o in objs if o["kind"] in MONITOR_KINDS]
        self.assertTrue(monitors, "no scenario renders a ServiceMonitor")
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i, (name, obj) in enumerate(monitors):
                f = Path(tmp) / f"{name}-{obj['kind']}-{i}.json"
                f.write_text(json.dumps(obj))
                files.append(str(f))
            r = subprocess.run(["node", str(HERE / "monitor_check.cjs"), node_modules, *files],
                               capture_output=True, text=True)
        print("\n  " + r.stdout.strip().replace("\n", "\n  "), file=sys.stderr)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    # --- what the objects say ----------------------------------------------------------------

    def test_capabilities_exact_and_never_privileged(self):
        for name in self.scenarios:
            with self.subTest(values=name):
                pod, c = self.container(name)
                sc = c["securityContext"]
                self.assertIs(sc["privileged"], False)
                self.assertIs(sc["allowPrivilegeEscalation"], False)
                self.assertIs(sc["readOnlyRootFilesystem"], True)
                self.assertEqual(sc["runAsUser"], 0)
                self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                self.assertEqual(set(sc["capabilities"]["add"]), CAPABILITIES)
                self.assertEqual(len(sc["capabilities"]["add"]), len(CAPABILITIES))
                # The node's network only for layer sharing (containerd reaches the agent on
                # 127.0.0.1, the peers each other at the nodes' addresses).
                if self.merged(name)["sharing"]["enabled"]:
                    self.assertIs(pod["hostNetwork"], True)
                    self.assertEqual(pod["dnsPolicy"], "ClusterFirstWithHostNet")
                else:
                    self.assertNotIn("hostNetwork", pod)
                    self.assertNotIn("dnsPolicy", pod)
                self.assertNotIn("hostIPC", pod)
                self.assertIs(pod["hostPID"], True)
                for _, obj in self.objects[name]:
                    for path, key, value in walk(obj):
                        self.assertFalse(key == "privileged" and value is True, f"privileged: true at {path}")

    def test_host_mounts_and_read_only_flags(self):
        read_only = {
            "/run/containerd": "/run/containerd",
            "/sys/fs/cgroup": "/sys/fs/cgroup",
            "/sys/fs/bpf": "/sys/fs/bpf",
            "/sys/kernel/tracing": "/sys/kernel/tracing",
            "/sys/kernel/btf": "/sys/kernel/btf",
        }
        k3s_certs = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
        # (read-only mounts: container path -> host path, the writable ones: volume name ->
        # path, the same on the node and in the container)
        expected = {
            "default": (read_only, {"rightsizing": CHECKPOINT_DIR}),
            "rightsizing-off": (read_only, {}),
            "k3s-full": ({
                "/run/k3s/containerd": "/run/k3s/containerd",
                "/sys/fs/cgroup": "/sys/fs/cgroup",
                "/sys/fs/bpf": "/sys/fs/bpf",
                "/sys/kernel/tracing": "/sys/kernel/debug/tracing",
            }, {"rightsizing": "/var/lib/rancher/ragent/rightsizing"}),
            "sharing": (read_only, {"rightsizing": CHECKPOINT_DIR, "certs-d": "/etc/containerd/certs.d"}),
            "sharing-existing-secret": (read_only, {"rightsizing": CHECKPOINT_DIR, "certs-d": k3s_certs}),
        }
        # The kubelet check of each writable directory: the checkpoint directory is created on
        # a fresh node; certs.d must be there already (containerd reads only the config_path it
        # was started with, and the agent refuses a missing one rather than write where
        # containerd never looks).
        writable_types = {"rightsizing": "DirectoryOrCreate", "certs-d": "Directory"}
        self.assertEqual(set(expected), set(self.scenarios), "every scenario's mounts are pinned here")
        for name, (mounts_wanted, writable_wanted) in expected.items():
            with self.subTest(values=name):
                pod, c = self.container(name)
                host_volumes = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
                got, writable = {}, {}
                for m in c["volumeMounts"]:
                    if m["name"] not in host_volumes:
                        continue
                    self.assertNotIn("subPath", m)
                    host = host_volumes[m["name"]]
                    if m.get("readOnly") is True:
                        got[m["mountPath"]] = host["path"]
                        self.assertEqual(host["type"], "Directory")
                    else:
                        # The checkpoint directory (the agent writes recommender.ckpt there) and
                        # certs.d (hosts.toml files): each at the path the config names, the
                        # node's, with no mount propagation.
                        self.assertIs(m.get("readOnly"), False, m)
                        self.assertIn(m["name"], writable_types, f"hostPath mount {m['mountPath']} is writable")
                        self.assertEqual(host, {"path": m["mountPath"], "type": writable_types[m["name"]]})
                        self.assertNotIn("mountPropagation", m)
                        writable[m["name"]] = m["mountPath"]
                self.assertEqual(got, mounts_wanted)
                self.assertEqual(writable, writable_wanted)
                self.assertEqual(len(host_volumes), len(mounts_wanted) + len(writable),
                                 "a hostPath volume is not mounted")
                config = self.config(name)
                self.assertEqual(config["rightsizing"].get("checkpoint_dir"), writable_wanted.get("rightsizing"))
                self.assertEqual(config.get("sharing", {}).get("certs_dir"), writable_wanted.get("certs-d"))
                # Every other mount of the container is read-only, the chart's and the extra
                # ones alike except what values add on purpose, and the sharing spool, an
                # emptyDir (the pod's own scratch space, not the node's files).
                extra = {m["name"] for m in self.merged(name)["extraVolumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                for m in c["volumeMounts"]:
                    if m["name"] == "spool":
                        self.assertEqual(volumes["spool"], {"name": "spool", "emptyDir": {}})
                        self.assertEqual(m["mountPath"], config["sharing"]["spool_dir"])
                    elif m["name"] not in extra and m["name"] not in writable:
                        self.assertIs(m.get("readOnly"), True, m)
                self.assertIs(c["securityContext"]["readOnlyRootFilesystem"], True)

    def test_containerd_socket_is_what_the_agent_dials(self):
        for name in self.scenarios:
            with self.subTest(values=name):
                socket = self.merged(name)["containerd"]["socket"]
                config = self.config(name)
                self.assertEqual(config["containerd"], socket)
                pod, c = self.container(name)
                mounted = [m["mountPath"] for m in c["volumeMounts"]]
                self.assertIn(str(Path(socket).parent), mounted)

    def rbac(self, scenario):
        """Every permission granted, as (namespace or "*", apiGroup, resource, verb), checking
        that each rule is bound to the agent's ServiceAccount and to nothing else."""
        objs = self.objects[scenario]
        sa = one(objs, "ServiceAccount")["metadata"]
        roles = {}
        for kind in ("ClusterRole", "Role"):
            for r in find(objs, kind):
                ns = r["metadata"].get("namespace", "*") if kind == "Role" else "*"
                roles[(kind, ns, r["metadata"]["name"])] = r["rules"]
        bound = set()
        for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
            for b in find(objs, kind):
                self.assertEqual(b["subjects"], [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}])
                self.assertEqual(b["roleRef"]["kind"], role_kind)
                ns = b["metadata"].get("namespace", "*") if kind == "RoleBinding" else "*"
                key = (role_kind, ns, b["roleRef"]["name"])
                self.assertIn(key, roles, f"{kind} {b['metadata']['name']} binds a role the chart does not define")
                bound.add(key)
        self.assertEqual(bound, set(roles), "a role is defined but not bound")
        grants = set()
        for (_, ns, _), rules in roles.items():
            for rule in rules:
                self.assertEqual(set(rule) - {"apiGroups", "resources", "verbs"}, set(), rule)
                for g in rule["apiGroups"]:
                    for res in rule["resources"]:
                        for v in rule["verbs"]:
                            self.assertNotIn("*", (g, res, v))
                            grants.add((ns, g, res, v))
        return grants

    def test_rbac_is_exactly_what_the_agent_uses(self):
        cluster = {("*", "", "pods", "list"), ("*", "", "pods", "watch"),
                   ("*", "", "nodes", "list"), ("*", "", "nodes", "watch"),
                   ("*", "ragent.dev", "prepulls", "get"), ("*", "ragent.dev", "prepulls", "list"),
                   ("*", "ragent.dev", "prepulls", "watch")}

        def events(ns):
            return {(ns, "events.k8s.io", "events", "create")}

        # Events about the cluster-scoped PrePull resources live in `default`.
        self.assertEqual(self.rbac("default"), cluster | events("default"))
        self.assertEqual(
            self.rbac("k3s-full"),
            cluster | events("default")
            | {("team-a", "", "secrets", "get"), ("team-b", "", "secrets", "get")},
        )
        # Layer sharing: the peers Service's EndpointSlices, in the release namespace only.
        peers = {(NAMESPACE, "discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")}
        for name in ("sharing", "sharing-existing-secret"):
            self.assertEqual(self.rbac(name), cluster | events("default") | peers)

    def test_secret_roles_only_in_listed_namespaces(self):
        for name in self.scenarios:
            with self.subTest(values=name):
                listed = set(self.merged(name)["prepull"]["pullSecretNamespaces"])
                secret_ns = {ns for ns, _, res, _ in self.rbac(name) if res == "secrets"}
                self.assertEqual(secret_ns, listed)
                in_config = self.config(name).get("kubernetes", {}).get("pull_secret_namespaces", [])
                self.assertEqual(set(in_config), listed)
                self.assertEqual(len(in_config), len(listed), "a namespace is listed twice")

    def test_probes_and_ports(self):
        for name in self.scenarios:
            with self.subTest(values=name):
                values = self.merged(name)
                port = values["agent"]["metricsPort"]
                _, c = self.container(name)
                ports = [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
                if values["sharing"]["enabled"]:
                    peer = values["sharing"]["port"]
                    ports.append({"name": "peer", "containerPort": peer, "protocol": "TCP"})
                    self.assertEqual(self.config(name)["sharing"]["peer_addr"], f"0.0.0.0:{peer}")
                self.assertEqual(c["ports"], ports)
                self.assertEqual(c["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})
                self.assertEqual(c["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})
                self.assertEqual(self.config(name)["agent"]["metrics_addr"], f"0.0.0.0:{port}")

    def test_downward_api_env(self):
        for name in self.scenarios:
            with self.subTest(values=name):
                _, c = self.container(name)
                env = {e["name"]: e for e in c["env"]}
                self.assertEqual(env["NODE_NAME"]["valueFrom"], {"fieldRef": {"fieldPath": "spec.nodeName"}})
                self.assertEqual(env["POD_NAMESPACE"]["valueFrom"], {"fieldRef": {"fieldPath": "metadata.namespace"}})
                self.assertEqual(c["args"], ["agent", "--config", "/etc/ragent/config.toml"])

    def test_daemonset_defaults(self):
        pod, c = self.container("default")
        self.assertEqual(pod["tolerations"], [{"operator": "Exists"}])
        self.assertEqual(pod["priorityClassName"], "system-node-critical")
        self.assertEqual(c["resources"], {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
        self.assertEqual(c["securityContext"]["seccompProfile"], {"type": "Unconfined"})
        pod, c = self.container("k3s-full")
        self.assertEqual(pod["tolerations"], self.scenarios["k3s-full"]["tolerations"])
        self.assertEqual(c["resources"], self.scenarios["k3s-full"]["resources"])
        self.assertEqual(pod["priorityClassName"], "platform-agents")

    # --- the config file ---------------------------------------------------------------------

    def config(self, scenario):
        cm = one(self.objects[scenario], "ConfigMap")
        return tomllib.loads(cm["data"]["config.toml"])

    def test_config_file_renders_only_what_is_set(self):
        self.assertEqual(self.config("default"), {
            "containerd": "/run/containerd/containerd.sock",
            "namespace": "k8s.io",
            "log_format": "json",
            "agent": {"metrics_addr": "0.0.0.0:9464", "ebpf": True},
            "rightsizing": {
                "enabled": True, "sample_interval_s": 15, "checkpoint_dir": CHECKPOINT_DIR,
                "checkpoint_interval_s": 300,
            },
        })
        self.assertEqual(self.config("rightsizing-off")["rightsizing"], {"enabled": False})
        # Only the keys set; the namespace of the Service comes from POD_NAMESPACE, the node
        # from NODE_NAME and the zone from the Node's label, so none of them is written.
        self.assertEqual(self.config("sharing")["sharing"], {
            "enabled": True, "peer_addr": "0.0.0.0:9465",
            "registries": ["docker.io", "ghcr.io", "registry.example.com:5000"],
            "public": ["docker.io/library", "registry.example.com:5000/base-images"],
            "certs_dir": "/etc/containerd/certs.d", "token_file": f"{PEER_TOKEN_DIR}/token",
            "spool_dir": SPOOL_DIR, "service": "ragent-peers",
        })
        self.assertEqual(self.config("sharing-existing-secret")["sharing"], {
            "enabled": True, "peer_addr": "0.0.0.0:9500", "registries": ["_default", "quay.io"],
            "public": ["quay.io"], "certs_dir": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
            "insecure_registries": ["mirror.internal:5000"],
            "auth": "/etc/ragent/registry-auth/.dockerconfigjson",
            "token_file": f"{PEER_TOKEN_DIR}/token",
            "spool_dir": SPOOL_DIR, "service": "ragent-node-agent-for-the-platform-team-in-region-eu-west-peers",
            "peer_timeout_ms": 500, "keep_s": 7200,
        })
        for name in ("default", "rightsizing-off", "k3s-full"):
            self.assertNotIn("sharing", self.config(name), name)
        full = self.config("k3s-full")
        auth = "/etc/ragent/registry-auth/.dockerconfigjson"
        self.assertEqual(full["prepull"], {
            "images": ["registry.example.com/team/api:v3", "registry.example.com/team/worker:v3"],
            "insecure_registries": ["mirror.internal:5000"],
            "concurrency": 8, "max_rate": "50M", "refresh_interval_s": 0, "retry_max_s": 120,
            "auth": auth,
        })
        self.assertEqual(full["rebase"], {
            "follow": ["registry.example.com/buildpacks/run:jammy"], "mode": "tag",
            "tag_suffix": "-patched", "poll_interval_s": 600, "retry_max_s": 300, "auth": auth,
        })
        self.assertEqual(full["kubernetes"], {
            "enabled": True, "pull_secret_namespaces": ["team-a", "team-b"],
        })
        self.assertEqual(full["agent"], {
            "metrics_addr": "0.0.0.0:9470", "ebpf": True, "cgroup_root": "/sys/fs/cgroup",
            "refresh_debounce_ms": 500, "series_grace_s": 600,
        })
        # Floats stay floats, whole numbers are integers (which the agent takes for a float
        # field too), nested maps are sub-tables.
        self.assertEqual(full["rightsizing"], {
            "enabled": True, "sample_interval_s": 30,
            "checkpoint_dir": "/var/lib/rancher/ragent/rightsizing", "checkpoint_interval_s": 120,
            "catalog": f"{CATALOG_DIR}/{CATALOG_KEY}",
            "headroom": {"fraction": 0.25, "system_reserved_cpu_cores": 1,
                         "system_reserved_memory_bytes": 2147483648},
            "model": {"safety_margin": 0.1, "memory_floor_bytes": 52428800, "retention_s": 1209600,
                      "cpu_histogram": {"first_bucket": 0.005, "ratio": 1.05, "max_value": 256,
                                        "half_life_s": 43200}},
        })
        for path, key, value in walk(full["rightsizing"]):
            if key in ("system_reserved_memory_bytes", "memory_floor_bytes", "retention_s",
                       "sample_interval_s", "checkpoint_interval_s"):
                self.assertIs(type(value), int, f"{path}.{key}")
        pod, c = self.container("k3s-full")
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        self.assertIs(mounts[str(Path(auth).parent)]["readOnly"], True)
        out = os.environ.get("RAGENT_CHART_OUT")
        if out:
            (Path(out) / "catalog").mkdir(parents=True, exist_ok=True)
            for name in self.scenarios:
                cm = one(self.objects[name], "ConfigMap")
                (Path(out) / f"{name}.toml").write_text(cm["data"]["config.toml"])
                if CATALOG_KEY in cm["data"]:
                    (Path(out) / "catalog" / f"{name}.toml").write_text(cm["data"][CATALOG_KEY])
            # The peer token each sharing scenario's agents would read from token_file: the
            # one the chart generated, or the operator's Secret's.
            (Path(out) / "peer-token").mkdir(exist_ok=True)
            for name in self.scenarios:
                if self.merged(name)["sharing"]["enabled"]:
                    (Path(out) / "peer-token" / f"{name}.token").write_text(self.peer_token(name))

    def peer_token(self, scenario):
        """The token the agents of a scenario read: the chart's Secret's, decoded, or (with
        sharing.token.existingSecret, a Secret the chart does not make) OPERATOR_TOKEN."""
        secrets = find(self.objects[scenario], "Secret")
        if self.merged(scenario)["sharing"]["token"]["existingSecret"]:
            self.assertEqual(secrets, [], "the chart makes a token Secret although one is given")
            return OPERATOR_TOKEN
        [secret] = secrets
        return base64.b64decode(secret["data"]["token"], validate=True).decode()

    def test_toml_numbers(self):
        """Helm reads a values file's numbers as floats: each reaches the config file as the
        number it was, whole ones as integers."""
        numbers = {"fraction": 0.1, "system_reserved_cpu_cores": 2.5, "system_reserved_memory_bytes": 8589934592}
        model = {"lower_widening_days": 1 / 24, "cpu_floor_cores": 1e-05, "upper_widening_days": 1e21,
                 "oom_min_bump_bytes": 0}
        objs = parse_manifests(self.chart.render({"rightsizing": {"headroom": numbers, "model": model}},
                                                 name=RELEASE, namespace=NAMESPACE))
        got = tomllib.loads(one(objs, "ConfigMap")["data"]["config.toml"])["rightsizing"]
        self.assertEqual(got["headroom"], numbers)
        self.assertEqual(got["model"], model)
        self.assertIs(type(got["headroom"]["system_reserved_memory_bytes"]), int)

    def test_catalog_is_a_read_only_file_the_config_names(self):
        for name in self.scenarios:
            with self.subTest(values=name):
                values = self.merged(name)["rightsizing"]
                cm = one(self.objects[name], "ConfigMap")
                pod, c = self.container(name)
                mounts = {m["name"]: m for m in c["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                config = self.config(name)["rightsizing"]
                if not (values["enabled"] and values["catalog"]):
                    self.assertNotIn(CATALOG_KEY, cm["data"])
                    self.assertNotIn("catalog", mounts)
                    self.assertNotIn("catalog", volumes)
                    self.assertNotIn("catalog", config, "unset: the agent's built-in catalog")
                    continue
                self.assertEqual(cm["data"][CATALOG_KEY].strip(), values["catalog"].strip())
                catalog = tomllib.loads(cm["data"][CATALOG_KEY])
                self.assertTrue(catalog["instance_type"])
                self.assertEqual(mounts["catalog"], {"name": "catalog", "mountPath": CATALOG_DIR, "readOnly": True})
                self.assertEqual(volumes["catalog"]["configMap"], {
                    "name": cm["metadata"]["name"], "items": [{"key": CATALOG_KEY, "path": CATALOG_KEY}],
                })
                self.assertEqual(config["catalog"], f"{CATALOG_DIR}/{CATALOG_KEY}")
        self.assertIn("catalog", self.config("k3s-full")["rightsizing"], "no scenario ships a catalog")

    def test_config_change_rolls_the_pods(self):
        def checksum(values):
            objs = parse_manifests(self.chart.render(values, name=RELEASE, namespace=NAMESPACE))
            return one(objs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

        self.assertNotEqual(checksum({}), checksum({"prepull": {"images": ["registry.example.com/a:b"]}}))
        catalog = '[[instance_type]]\nname = "a"\nvcpu = 1\nmemory_gib = 1\nhourly_price = 0.01\n'
        self.assertNotEqual(checksum({"rightsizing": {"catalog": catalog}}),
                            checksum({"rightsizing": {"catalog": catalog.replace("0.01", "0.02")}}))

    # --- layer sharing ------------------------------------------------------------------------

    def test_sharing_off_adds_nothing(self):
        for name in ("default", "rightsizing-off", "k3s-full"):
            with self.subTest(values=name):
                self.assertFalse(self.merged(name)["sharing"]["enabled"])
                objs = self.objects[name]
                self.assertEqual(find(objs, "Secret"), [])
                self.assertEqual([s for s in find(objs, "Service") if s["metadata"]["name"].endswith("-peers")], [])
                pod, c = self.container(name)
                names = {v["name"] for v in pod["volumes"]}
                self.assertEqual(names & {"peer-token", "spool", "certs-d"}, set())

    def test_sharing_peers_service_token_and_mounts(self):
        for name in ("sharing", "sharing-existing-secret"):
            with self.subTest(values=name):
                values = self.merged(name)["sharing"]
                objs = self.objects[name]
                config = self.config(name)["sharing"]
                ds = one(objs, "DaemonSet")
                pod, c = self.container(name)
                # The peers Service: headless, ready endpoints only, the pods of this release,
                # port "peer"; its name is what the agent watches, and a DNS label.
                [svc] = find(objs, "Service", config["service"])
                self.assertLessEqual(len(svc["metadata"]["name"]), 63)
                self.assertEqual(svc["metadata"]["namespace"], NAMESPACE)
                self.assertEqual(svc["spec"]["clusterIP"], "None")
                self.assertIs(svc["spec"]["publishNotReadyAddresses"], False)
                self.assertEqual(svc["spec"]["selector"], ds["spec"]["selector"]["matchLabels"])
                pod_labels = ds["spec"]["template"]["metadata"]["labels"]
                for k, v in svc["spec"]["selector"].items():
                    self.assertEqual(pod_labels.get(k), v)
                self.assertEqual(svc["spec"]["ports"], [
                    {"name": "peer", "port": values["port"], "targetPort": "peer", "protocol": "TCP"}])
                # The token: the Secret's key `token`, mounted read-only where token_file is.
                volumes = {v["name"]: v for v in pod["volumes"]}
                mounts = {m["name"]: m for m in c["volumeMounts"]}
                self.assertEqual(mounts["peer-token"], {"name": "peer-token", "mountPath": PEER_TOKEN_DIR, "readOnly": True})
                self.assertEqual(config["token_file"], f"{PEER_TOKEN_DIR}/token")
                secret = volumes["peer-token"]["secret"]
                self.assertEqual(secret["items"], [{"key": "token", "path": "token"}])
                self.assertEqual(secret["defaultMode"], 0o400)
                given = values["token"]["existingSecret"]
                if given:
                    self.assertEqual(secret["secretName"], given)
                else:
                    [made] = find(objs, "Secret")
                    self.assertEqual(secret["secretName"], made["metadata"]["name"])
                    self.assertEqual(made["metadata"]["namespace"], NAMESPACE)
                    self.assertEqual(set(made["data"]), {"token"})
                    token = self.peer_token(name)
                    self.assertGreaterEqual(len(token), 32)
                    self.assertTrue(token.isascii() and token.isalnum(), token)

    def test_generated_token_is_random(self):
        """Each render without a cluster (lookup finds no Secret) makes a new token: it is
        generated, never a constant of the chart."""
        def token():
            objs = parse_manifests(self.chart.render({"sharing": {"enabled": True}}, name=RELEASE,
                                                     namespace=NAMESPACE, is_install=True))
            return one(objs, "Secret")["data"]["token"]

        self.assertNotEqual(token(), token())

    def test_sharing_refuses_what_cannot_run(self):
        """Value combinations the schema cannot express: with sharing on the pod uses the node's
        ports, so the peer port must differ from the metrics port, and a surge pod could never
        start beside the old one; the peers are found through the kube side."""
        clash = {"sharing": {"enabled": True, "port": 9464}}
        surge = {"sharing": {"enabled": True},
                 "updateStrategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}}
        no_kube = {"sharing": {"enabled": True}, "kubernetes": {"enabled": False}}
        for what, values, needle in (("port clash", clash, "sharing.port and agent.metricsPort"),
                                     ("maxSurge", surge, "maxSurge"),
                                     ("no kube side", no_kube, "kubernetes.enabled")):
            with self.subTest(what):
                with self.assertRaises(helm.HelmError) as e:
                    self.chart.render(values, name=RELEASE, namespace=NAMESPACE)
                self.assertIn(needle, str(e.exception))
                # The same values are fine with sharing off.
                values["sharing"]["enabled"] = False
                self.chart.render(values, name=RELEASE, namespace=NAMESPACE)
        self.chart.render({"sharing": {"enabled": True},
                           "updateStrategy": {"rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}},
                          name=RELEASE, namespace=NAMESPACE)

    # --- Prometheus ----------------------------------------------------------------------------

    def test_service_monitor(self):
        self.assertEqual(find(self.objects["default"], "ServiceMonitor"), [])
        self.assertEqual(find(self.objects["default"], "Service"), [])
        objs = self.objects["k3s-full"]
        sm, svc = one(objs, "ServiceMonitor"), one(objs, "Service")
        ds = one(objs, "DaemonSet")
        self.assertEqual(sm["metadata"]["namespace"], "monitoring")
        self.assertEqual(sm["metadata"]["labels"]["release"], "kube-prometheus-stack")
        self.assertEqual(sm["spec"]["namespaceSelector"], {"matchNames": [NAMESPACE]})
        labels = svc["metadata"]["labels"]
        for k, v in sm["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(labels.get(k), v)
        pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        for k, v in svc["spec"]["selector"].items():
            self.assertEqual(pod_labels.get(k), v)
        self.assertEqual(svc["spec"]["clusterIP"], "None")
        self.assertEqual(svc["spec"]["ports"][0]["name"], "metrics")
        self.assertEqual(svc["spec"]["ports"][0]["targetPort"], "metrics")
        [ep] = sm["spec"]["endpoints"]
        self.assertEqual((ep["port"], ep["path"]), ("metrics", "/metrics"))
        relabel = ep["relabelings"]
        self.assertIn({"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"}, relabel)
        self.assertIn({"targetLabel": "cluster", "replacement": "prod-eu-1", "action": "replace"}, relabel)
        self.assertEqual(relabel[-1]["targetLabel"], "host_ip", "values' relabelings come after the chart's")

    def test_notes_say_how_to_see_the_metrics(self):
        for name in self.scenarios:
            with self.subTest(values=name):
                notes = next(v for k, v in self.rendered[name].items() if k.endswith("NOTES.txt"))
                port = self.merged(name)["agent"]["metricsPort"]
                self.assertIn(f"port-forward $POD {port}:metrics", notes)
                self.assertIn(f"curl -s http://127.0.0.1:{port}/metrics", notes)
                self.assertEqual(f"curl -s http://127.0.0.1:{port}/api/v1/recommendations" in notes,
                                 self.merged(name)["rightsizing"]["enabled"])
                self.assertEqual("ServiceMonitor" in notes.split("Prometheus:")[1],
                                 self.merged(name)["serviceMonitor"]["enabled"])
                sharing = self.merged(name)["sharing"]
                self.assertEqual("Layer sharing is on" in notes, sharing["enabled"])
                if sharing["enabled"]:
                    service = self.config(name)["sharing"]["service"]
                    self.assertIn(f"kubernetes.io/service-name={service}", notes)
                    self.assertIn(f"http://127.0.0.1:{sharing['port']}", notes)
                    secret = sharing["token"]["existingSecret"] or find(self.objects[name], "Secret")[0]["metadata"]["name"]
                    self.assertIn(f"Secret {secret}", notes)

    # --- the CRD -------------------------------------------------------------------------------

    def test_crd_matches_the_rbac(self):
        if not self.crds:
            self.skipTest("no CRD under deploy/helm/ragent/crds/ yet")
        prepull = [c for c in self.crds if c["spec"]["group"] == "ragent.dev"]
        self.assertEqual(len(prepull), 1, [c["__file"] for c in self.crds])
        crd = prepull[0]
        self.assertEqual(crd["metadata"]["name"], "prepulls.ragent.dev")
        self.assertEqual(crd["spec"]["names"]["plural"], "prepulls")
        self.assertEqual(crd["spec"]["names"]["kind"], "PrePull")
        self.assertEqual(crd["spec"]["scope"], "Cluster")
        self.assertIn("v1alpha1", [v["name"] for v in crd["spec"]["versions"]])
        granted = {res for ns, g, res, _ in self.rbac("default") if g == "ragent.dev"}
        self.assertEqual(granted, {crd["spec"]["names"]["plural"]})


if __name__ == "__main__":
    unittest.main()
