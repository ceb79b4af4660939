//! Concurrent requests for one key share one piece of work. The work runs as
//! its own task, so a reader that gives up does not cancel it for the others.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;

use crate::{Error, Result};

/// A flight to wait for: every waiter gets a clone of its result.
pub type Flight<V> = Shared<BoxFuture<'static, Result<V>>>;

pub struct SingleFlight<K, V> {
    inflight: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Arc::default(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless the same key is already in flight, in which case it
    /// waits for that one. `work` is only called by the leader.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let flight = self.join_or_lead(key, || Some(work()));
        flight.expect("work that always leads").await
    }

    /// The flight of `key` to wait for: the one in flight, or the one `lead`
    /// starts. `lead` runs under the lock that joiners take, so it may
    /// decide whether there is work to do at all: `None` starts nothing,
    /// and nobody joins work that was never going to happen. Not async, so
    /// the caller can finish what `lead` began once the lock is released.
    pub fn join_or_lead<F, Fut>(&self, key: K, lead: F) -> Option<Flight<V>>
    where
        F: FnOnce() -> Option<Fut>,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let mut map = self.inflight.lock();
        if let Some(f) = map.get(&key) {
            return Some(f.clone());
        }
        let fut = lead()?;
        let map_ref = self.inflight.clone();
        let k = key.clone();
        // The map lock is held until the flight is inserted, so the
        // task's removal cannot run before the insertion.
        let task = tokio::spawn(async move {
            let v = fut.await;
            map_ref.lock().remove(&k);
            v
        });
        let f = async move {
            task.await
                .unwrap_or_else(|e| Err(Error::Cache(format!("fetch task failed: {e}"))))
        }
        .boxed()
        .shared();
        map.insert(key, f.clone());
        Some(f)
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_callers_one_execution() {
        let sf: Arc<SingleFlight<u32, u64>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut joins = vec![];
        for _ in 0..32 {
            let sf = sf.clone();
            let calls = calls.clone();
            joins.push(tokio::spawn(async move {
                sf.run(7, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(42)
                })
                .await
            }));
        }
        for j in joins {
            assert_eq!(j.await.unwrap().unwrap(), 42);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(sf.in_flight(), 0);
        // A later call runs again: results are not memoised here.
        let v = sf
            .run(7, || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(1) }
            })
            .await
            .unwrap();
        assert_eq!((v, calls.load(Ordering::SeqCst)), (1, 2));
    }

    #[tokio::test]
    async fn errors_reach_every_waiter() {
        let sf: Arc<SingleFlight<u32, u64>> = Arc::default();
        let a = sf.run(1, || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(Error::Cache("boom".into()))
        });
        let b = sf.run(1, || async { Ok(5) });
        let (a, b) = tokio::join!(a, b);
        assert!(a.is_err() && b.is_err());
    }
}
