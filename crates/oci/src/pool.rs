//! Frame buffers shared by the two places that stream blobs out of an archive (the server's
//! archive store and push): reused and bounded. At most `cap` buffers exist at once (in use or
//! idle), so memory for blob streams stays under that many frames however many streams run;
//! a stream waits for a buffer when all are out (they come back once the frames they hold are
//! written to their sockets). Reuse also spares glibc's arenas the churn of 1 MiB
//! allocations, which they would keep resident. Callers wait for a buffer while holding none
//! from the same pool, so waits cannot form a cycle.

use std::sync::{Arc, Condvar, Mutex};

/// A bounded pool of byte buffers.
pub(crate) struct Pool(Arc<Inner>);

struct Inner {
    /// Idle buffers, and how many exist in all.
    state: Mutex<(Vec<Vec<u8>>, usize)>,
    returned: Condvar,
    cap: usize,
}

/// A buffer that goes back to its pool when dropped: wrap it with `Bytes::from_owner` and it
/// returns when the last `Bytes` over it is dropped.
pub(crate) struct Pooled(pub(crate) Vec<u8>, Arc<Inner>);

impl Pool {
    /// A pool of at most `cap` (at least 1) buffers.
    pub(crate) fn new(cap: usize) -> Pool {
        Pool(Arc::new(Inner {
            state: Mutex::new((Vec::new(), 0)),
            returned: Condvar::new(),
            cap: cap.max(1),
        }))
    }

    /// A buffer; blocks while `cap` are out.
    pub(crate) fn take(&self) -> Pooled {
        let inner = &self.0;
        let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(buf) = st.0.pop() {
                return Pooled(buf, Arc::clone(inner));
            }
            if st.1 < inner.cap {
                st.1 += 1;
                return Pooled(Vec::new(), Arc::clone(inner));
            }
            st = inner.returned.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut st = self.1.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0.push(std::mem::take(&mut self.0));
        drop(st);
        self.1.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_reused() {
        let pool = Pool::new(2);
        let mut a = pool.take();
        a.0.extend_from_slice(b"abc");
        let b = pool.take();
        let waiter = {
            let inner = Arc::clone(&pool.0);
            std::thread::spawn(move || Pool(inner).take().0.capacity())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a third buffer must wait");
        drop(a);
        assert!(waiter.join().unwrap() >= 3, "the returned buffer is reused");
        drop(b);
        assert_eq!(pool.0.state.lock().unwrap().1, 2);
    }
}
