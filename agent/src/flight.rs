//! Single-flight: concurrent callers asking for the same key share one run of the work. The
//! pre-pull uses it per blob digest, so overlapping pulls inside one process fetch a blob once.
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};

type Flights<T> = Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, T>>>>>;

/// The work in the air, by key. A finished flight leaves the map, so a later call runs anew.
pub struct SingleFlight<T: Clone> {
    flights: Flights<T>,
}

impl<T: Clone> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    /// Runs `start()` for `key`, or joins the run already in the air. Returns the result and
    /// whether this caller's `start` was the one that ran. The work goes on while any caller
    /// still waits for it (a caller that is dropped does not cancel the others).
    pub async fn run<F>(&self, key: &str, start: impl FnOnce() -> F) -> (T, bool)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (flight, leader) = {
            let mut flights = lock(&self.flights);
            match flights.get(key) {
                Some(f) => (f.clone(), false),
                None => {
                    let work = start();
                    let map = self.flights.clone();
                    let k = key.to_string();
                    let f = async move {
                        let out = work.await;
                        lock(&map).remove(&k);
                        out
                    }
                    .boxed()
                    .shared();
                    flights.insert(key.to_string(), f.clone());
                    (f, true)
                }
            }
        };
        (flight.await, leader)
    }

    /// Keys in the air now.
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_of_one_key_share_one_run() {
        let f = SingleFlight::<u32>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let r1 = runs.clone();
        let first = f.run("sha256:a", move || {
            r1.fetch_add(1, Ordering::SeqCst);
            async move {
                let _ = wait.await;
                7
            }
        });
        let r2 = runs.clone();
        let second = f.run("sha256:a", move || {
            r2.fetch_add(1, Ordering::SeqCst);
            async { 8 }
        });
        let r3 = runs.clone();
        let other = f.run("sha256:b", move || {
            r3.fetch_add(1, Ordering::SeqCst);
            async { 9 }
        });
        let release = async {
            // Both callers of sha256:a are registered before the first run may finish.
            tokio::task::yield_now().await;
            let _ = go.send(());
        };
        let (a, b, c, ()) = tokio::join!(first, second, other, release);
        assert_eq!(a, (7, true));
        assert_eq!(
            b,
            (7, false),
            "the second caller got the first run's result"
        );
        assert_eq!(c, (9, true), "another key runs on its own");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(f.in_flight(), 0, "finished flights leave the map");
        // Later calls run again (the blob may have been removed since).
        assert_eq!(f.run("sha256:a", || async { 10 }).await, (10, true));
    }

    #[tokio::test]
    async fn a_dropped_leader_does_not_cancel_the_followers() {
        let f = SingleFlight::<u32>::default();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let mut leader = Box::pin(f.run("k", || async move {
            let _ = wait.await;
            5
        }));
        // Poll the leader once so the flight is registered, then drop it.
        assert!(futures::poll!(leader.as_mut()).is_pending());
        drop(leader);
        let follower = f.run("k", || async { 6 });
        let _ = go.send(());
        assert_eq!(follower.await, (5, false));
    }
}
