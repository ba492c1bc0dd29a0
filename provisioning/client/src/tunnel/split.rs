//! Read and write halves of one I/O object for two tasks, like [`tokio::io::split`], except that
//! a half never blocks its worker thread; and [`PollMutex`], the lock that does it (the tunnel's
//! state uses it too).
//!
//! `tokio::io::split` keeps the object behind a `std` mutex held for each whole poll. A tunnel's
//! reader and writer poll a TLS stream, and a poll can take tens of microseconds (decrypting or
//! sealing records, a `read` or `writev` call), so the other half's worker thread slept on the
//! mutex's futex meanwhile: its other tasks (a relay, another tunnel, the accept loop) waited
//! with it. Scheduler traces of `bench/tunnel` counted more such sleeps on the split than on
//! anything else (`docs/0006-tunnel.md`, "Blocking").
//!
//! Here a half that finds the other half's poll in progress leaves its waker and returns
//! `Pending`; the other half wakes it when its poll ends. The worker runs other tasks meanwhile.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A `std` mutex whose [`PollMutex::poll_lock`] waits as `Pending` instead of putting the thread
/// to sleep: a task that finds it held leaves its waker, and releasing the lock wakes it.
#[derive(Debug)]
pub(crate) struct PollMutex<T> {
    value: Mutex<T>,
    /// Tasks that found the value locked in [`PollMutex::poll_lock`].
    waiters: Mutex<Vec<Waker>>,
    /// `waiters` is not empty (read after each release, so releasing costs no second lock).
    wanted: AtomicBool,
}

/// A locked [`PollMutex`]; releasing it wakes the tasks that wait for it.
pub(crate) struct PollGuard<'a, T> {
    guard: Option<MutexGuard<'a, T>>,
    lock: &'a PollMutex<T>,
}

impl<T> PollMutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            value: Mutex::new(value),
            waiters: Mutex::new(Vec::new()),
            wanted: AtomicBool::new(false),
        }
    }

    /// Lock, blocking the thread while another holds it (for calls outside a poll).
    pub(crate) fn lock(&self) -> PollGuard<'_, T> {
        PollGuard { guard: Some(lock(&self.value)), lock: self }
    }

    /// The value, or `Pending` (woken when it is released) while another task holds it.
    pub(crate) fn poll_lock(&self, cx: &mut Context<'_>) -> Poll<PollGuard<'_, T>> {
        if let Some(g) = self.try_lock() {
            return Poll::Ready(g);
        }
        {
            let mut w = lock(&self.waiters);
            if !w.iter().any(|w| w.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            self.wanted.store(true, Ordering::Relaxed);
        }
        // Pairs with the fence in `PollGuard::drop`: either that release sees the flag, or this
        // second try sees the value released (the waker left behind only wakes spuriously).
        std::sync::atomic::fence(Ordering::SeqCst);
        match self.try_lock() {
            Some(g) => Poll::Ready(g),
            None => Poll::Pending,
        }
    }

    fn try_lock(&self) -> Option<PollGuard<'_, T>> {
        let guard = match self.value.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(PollGuard { guard: Some(guard), lock: self })
    }
}

impl<T> std::ops::Deref for PollGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Only `drop` takes the guard.
        self.guard.as_deref().unwrap_or_else(|| unreachable!("a released lock is not used"))
    }
}

impl<T> std::ops::DerefMut for PollGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_deref_mut().unwrap_or_else(|| unreachable!("a released lock is not used"))
    }
}

impl<T> Drop for PollGuard<'_, T> {
    fn drop(&mut self) {
        drop(self.guard.take());
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.lock.wanted.load(Ordering::Relaxed) {
            let waiters = {
                let mut w = lock(&self.lock.waiters);
                self.lock.wanted.store(false, Ordering::Relaxed);
                std::mem::take(&mut *w)
            };
            for w in waiters {
                w.wake();
            }
        }
    }
}

fn lock<W>(m: &Mutex<W>) -> MutexGuard<'_, W> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Split `io` into a read half and a write half for two tasks (see the module docs).
pub fn split<T>(io: T) -> (ReadHalf<T>, WriteHalf<T>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let vectored = io.is_write_vectored();
    let inner = Arc::new(Inner { io: PollMutex::new(io), vectored });
    (ReadHalf(Half(inner.clone())), WriteHalf(Half(inner)))
}

#[derive(Debug)]
struct Inner<T> {
    io: PollMutex<T>,
    /// The object's own [`AsyncWrite::is_write_vectored`].
    vectored: bool,
}

#[derive(Debug)]
struct Half<T>(Arc<Inner<T>>);

impl<T: Unpin> Half<T> {
    /// Run `f` on the object, or return `Pending` (and be woken) while the other half polls it.
    fn poll_with<R>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        let mut io = std::task::ready!(self.0.io.poll_lock(cx));
        f(Pin::new(&mut *io), cx)
    }
}

/// The read half of [`split`].
#[derive(Debug)]
pub struct ReadHalf<T>(Half<T>);

/// The write half of [`split`].
#[derive(Debug)]
pub struct WriteHalf<T>(Half<T>);

impl<T: AsyncRead + Unpin> AsyncRead for ReadHalf<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_with(cx, |io, cx| io.poll_read(cx, buf))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteHalf<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_with(cx, |io, cx| io.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_with(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.0.0.vectored
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_with(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_with(cx, |io, cx| io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What [`Hooked`] runs inside its next read.
    type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

    /// An I/O object whose read runs a hook first (which polls the write half meanwhile).
    struct Hooked {
        hook: Hook,
        written: Vec<u8>,
    }

    impl AsyncRead for Hooked {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(hook) = lock(&self.hook).take() {
                hook();
            }
            buf.put_slice(b"r");
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Hooked {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_half_waits_for_the_other_halfs_poll_without_blocking_and_is_woken_after_it() {
        let hook: Hook = Arc::new(Mutex::new(None));
        let (mut rd, wr) = split(Hooked { hook: hook.clone(), written: Vec::new() });
        let wr = Arc::new(Mutex::new(wr));
        let wakes = Arc::new(Wakes::default());
        let during = Arc::new(Mutex::new(None));
        {
            let (wr, wakes, during) = (wr.clone(), wakes.clone(), during.clone());
            *lock(&hook) = Some(Box::new(move || {
                // The read half is inside its poll: the write half must not block (on this
                // thread that would be a deadlock) but wait.
                let waker = Waker::from(wakes);
                let mut cx = Context::from_waker(&waker);
                let r = Pin::new(&mut *lock(&wr)).poll_write(&mut cx, b"w");
                *lock(&during) = Some(r.is_pending());
            }));
        }
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut space = [0u8; 4];
        let mut buf = ReadBuf::new(&mut space);
        assert!(matches!(Pin::new(&mut rd).poll_read(&mut cx, &mut buf), Poll::Ready(Ok(()))));
        assert_eq!(buf.filled(), b"r");
        assert_eq!(*lock(&during), Some(true), "the write half waited");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "and was woken when the read ended");
        let r = Pin::new(&mut *lock(&wr)).poll_write(&mut cx, b"w");
        assert!(matches!(r, Poll::Ready(Ok(1))));
        drop(rd);
        let wr = Arc::try_unwrap(wr)
            .ok()
            .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner));
        let inner = wr.map(|w| w.0.0).and_then(|i| Arc::try_unwrap(i).ok());
        let written = inner.map(|i| i.io.lock().written.clone());
        assert_eq!(written.as_deref(), Some(&b"w"[..]), "one write went through, after the wait");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_halves_move_data_at_once_on_two_workers() {
        let (a, b) = tokio::io::duplex(4096);
        let (a_rd, a_wr) = split(a);
        let (b_rd, b_wr) = split(b);
        const N: usize = 8 << 20;
        let pattern = |i: usize| (i % 251) as u8;
        let send = |mut w: WriteHalf<tokio::io::DuplexStream>| async move {
            let data: Vec<u8> = (0..N).map(pattern).collect();
            for chunk in data.chunks(7919) {
                w.write_all(chunk).await?;
            }
            w.shutdown().await
        };
        let check = |mut r: ReadHalf<tokio::io::DuplexStream>| async move {
            let mut got = Vec::with_capacity(N);
            r.read_to_end(&mut got).await?;
            Ok::<_, io::Error>(
                got.iter().enumerate().all(|(i, b)| *b == pattern(i)) && got.len() == N,
            )
        };
        let run = async {
            tokio::try_join!(
                tokio::spawn(send(a_wr)),
                tokio::spawn(send(b_wr)),
                tokio::spawn(check(b_rd)),
                tokio::spawn(check(a_rd)),
            )
        };
        let (s1, s2, c1, c2) = tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("no wake-up lost: both directions finish")
            .expect("tasks ran");
        s1.expect("a sent");
        s2.expect("b sent");
        assert!(c1.expect("b read"), "b got a's bytes in order");
        assert!(c2.expect("a read"), "a got b's bytes in order");
    }
}
