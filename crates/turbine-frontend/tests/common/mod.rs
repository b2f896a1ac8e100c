//! Helpers shared by the frontend's integration tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use turbine_engine::{Engine, EngineError, EngineStream, KvCache};
use turbine_protocols::PreprocessedRequest;

/// An engine that counts the requests it is given, so tests can see where routing sent them.
pub struct Counting<E> {
    inner: E,
    served: Arc<AtomicUsize>,
}

/// Wraps `inner`; the counter reads how many requests it has been given.
pub fn counting<E: Engine>(inner: E) -> (Counting<E>, Arc<AtomicUsize>) {
    let served = Arc::new(AtomicUsize::new(0));
    (
        Counting {
            inner,
            served: served.clone(),
        },
        served,
    )
}

impl<E: Engine> Engine for Counting<E> {
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        self.served.fetch_add(1, Ordering::SeqCst);
        self.inner.generate(request, cancel)
    }

    fn kv_cache(&self) -> Option<KvCache> {
        self.inner.kv_cache()
    }
}
