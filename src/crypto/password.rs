//! Password hashing with argon2id on a fixed pool of worker threads.
//!
//! Hashing is the most expensive thing the service does (97% of a login), so it runs
//! off the async runtime on `workers` dedicated threads, each reusing one memory block
//! of `m` KiB, fed by a queue of `queue` jobs. A job that finds the queue full is
//! refused at once ([`Overloaded`]) rather than waiting: the HTTP layer answers 503, and
//! the runtime stays free for token checks and health probes. The pool's memory is
//! therefore bounded by `workers * m` KiB.

use std::cell::RefCell;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine;
use rand::rngs::OsRng;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// Argon2id cost parameters, written `argon2id:m=19456,t=2,p=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    /// Memory in KiB.
    pub m: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl FromStr for HashParams {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest =
            s.trim().strip_prefix("argon2id:").ok_or_else(|| format!("expected argon2id:m=..,t=..,p=.., got {s:?}"))?;
        let (mut m, mut t, mut p) = (None, None, None);
        for kv in rest.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("bad parameter {kv:?}"))?;
            let v: u32 = v.trim().parse().map_err(|_| format!("bad number in {kv:?}"))?;
            match k.trim() {
                "m" => m = Some(v),
                "t" => t = Some(v),
                "p" => p = Some(v),
                other => return Err(format!("unknown argon2 parameter {other:?}")),
            }
        }
        let hp = HashParams { m: m.ok_or("m is missing")?, t: t.ok_or("t is missing")?, p: p.ok_or("p is missing")? };
        hp.argon2_params()?;
        Ok(hp)
    }
}

impl HashParams {
    fn argon2_params(&self) -> Result<Params, String> {
        Params::new(self.m, self.t, self.p, None).map_err(|e| format!("argon2 rejects these parameters: {e}"))
    }
}

/// The hashing queue is full; try again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password hashing is overloaded")]
pub struct Overloaded;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Whether the request a check is for was given up (its client hung up, or it timed
/// out). A use case that must act on its check's outcome whatever the client does runs
/// on a task of its own, which its request's future does not end; this is how its
/// queued job still learns that nobody waits for it (see [`PasswordHasher::verify`]).
#[derive(Clone, Debug, Default)]
pub struct Abandoned(Arc<AtomicBool>);

impl Abandoned {
    /// Whether the request was given up.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// A guard, for the request's own future, that marks the request given up when it
    /// is dropped (after the answer too, when nothing looks any more).
    pub fn on_drop(&self) -> AbandonOnDrop {
        AbandonOnDrop(Arc::clone(&self.0))
    }
}

/// See [`Abandoned::on_drop`].
pub struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Counts a job as running while it lives (a panicking job too).
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn start(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A reserved place in the hashing pool. Taking one first lets a caller learn about
/// overload before it commits to anything else (such as counting a login attempt).
pub struct HashPermit(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// Hashes and verifies passwords on a bounded pool of threads.
#[derive(Clone)]
pub struct PasswordHasher {
    inner: Arc<Inner>,
}

struct Inner {
    params: HashParams,
    // Unbounded: the admission semaphore is what bounds it.
    tx: Sender<Job>,
    admission: Arc<tokio::sync::Semaphore>,
    capacity: usize,
    dummy: String,
    workers: usize,
    running: Arc<AtomicUsize>,
}

thread_local! {
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

impl PasswordHasher {
    /// Starts `workers` threads with room for `queue` waiting jobs.
    pub fn start(params: HashParams, workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new().name(format!("gatehouse-hash-{i}")).spawn(move || worker(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a hashing thread");
            }
        }
        // On a thread of its own, so that its memory block is freed when it ends.
        let dummy = std::thread::scope(|s| {
            s.spawn(|| hash_blocking(&params, b"gatehouse dummy password for unknown users")).join()
        })
        .unwrap_or_default();
        let capacity = workers + queue;
        Self {
            inner: Arc::new(Inner {
                params,
                tx,
                admission: Arc::new(tokio::sync::Semaphore::new(capacity)),
                capacity,
                dummy,
                workers,
                running: Arc::default(),
            }),
        }
    }

    /// Jobs queued or running now.
    pub fn in_flight(&self) -> usize {
        self.inner.capacity - self.inner.admission.available_permits()
    }

    /// Jobs running now (the rest of [`Self::in_flight`]'s places wait in the queue, or
    /// for their request to send its job).
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Relaxed)
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.inner.workers
    }

    /// Reserves a place for one hash, or says at once that there is none.
    pub fn admit(&self) -> Result<HashPermit, Overloaded> {
        Arc::clone(&self.inner.admission).try_acquire_owned().map(HashPermit).map_err(|_| Overloaded)
    }

    /// Hashes a new password into a PHC string.
    pub async fn hash(&self, permit: HashPermit, password: &SecretString) -> Result<String, Overloaded> {
        self.hash_for(permit, password, None).await
    }

    /// [`Self::hash`] for a request that may be `abandoned` (skipped as
    /// [`Self::verify`]'s check is).
    pub async fn hash_for(
        &self,
        permit: HashPermit,
        password: &SecretString,
        abandoned: Option<&Abandoned>,
    ) -> Result<String, Overloaded> {
        let params = self.inner.params;
        let pw = password.expose_secret().as_bytes().to_vec();
        self.run(permit, abandoned.cloned(), move || hash_blocking(&params, &pw)).await
    }

    /// Checks `password` against `stored`, or against a dummy hash of equal cost when
    /// there is none, so that unknown users take as long as known ones. A stored hash
    /// keeps the parameters it was made with: it verifies with them. A check whose
    /// request is `abandoned` before it starts is skipped (`Overloaded`); one that has
    /// started ends, and its outcome is returned.
    pub async fn verify(
        &self,
        permit: HashPermit,
        password: &SecretString,
        stored: Option<&str>,
        abandoned: &Abandoned,
    ) -> Result<bool, Overloaded> {
        let pw = password.expose_secret().as_bytes().to_vec();
        let real = stored.is_some();
        let phc = stored.unwrap_or(&self.inner.dummy).to_owned();
        self.run(permit, Some(abandoned.clone()), move || verify_blocking(&pw, &phc) && real).await
    }

    /// Runs `f` on a hashing thread, unless its request is dropped or `abandoned` before
    /// a thread reaches it.
    async fn run<T: Send + 'static>(
        &self,
        permit: HashPermit,
        abandoned: Option<Abandoned>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Overloaded> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let running = Arc::clone(&self.inner.running);
        let job: Job = Box::new(move || {
            // A request dropped while its job waited (its client went away, or timed
            // out under overload) wants no answer: its hash would only delay the
            // queued ones behind it.
            if reply.is_closed() || abandoned.as_ref().is_some_and(Abandoned::is_set) {
                drop(permit);
                return;
            }
            let _g = span.enter();
            let out = {
                let _running = Running::start(&running);
                f()
            };
            // The place is free before the answer is: whoever reads it sees it free.
            drop(permit);
            let _ = reply.send(out);
        });
        // The worker threads end when the last handle drops the sender.
        self.inner.tx.send(job).map_err(|_| Overloaded)?;
        rx.await.map_err(|_| Overloaded)
    }
}

/// How much lower the hashing threads' scheduling priority is than the process's (the
/// `nice` value added, up to 19). They stay in the ordinary class: at saturation
/// hashing takes every core, and a woken runtime or database thread should usually run
/// before them (nice 10 weighs about a tenth of nice 0), though not always (see the
/// README's Design decisions: stalls of PostgreSQL's processes under overload).
///
/// From the ninth to the eleventh session they ran in Linux's idle class
/// (`SCHED_IDLE`), moving to this nice value while starved. That left cores idle
/// while logins waited: in alternating 8 s rounds of `wrk -t1 -c16` logins on
/// PostgreSQL (2026-12-07, twelfth session) `/proc/stat` counted 1.19-1.25% of the
/// CPU idle with the idle class against 0.06-0.12% niced, and niced served 1.6-3.4%
/// more logins (see the README's Design decisions).
pub const HASH_NICE: i32 = 10;

/// Lowers this thread's priority by [`HASH_NICE`] below `base_nice` (Linux; elsewhere
/// a no-op), logging what failed.
fn lower_priority(base_nice: i32) {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), (base_nice + HASH_NICE).min(19))
    {
        tracing::warn!(error = %e, "could not lower a hashing thread's priority");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = base_nice;
}

/// This thread's nice value (Linux; elsewhere 0): at a worker's start, its starter's.
fn base_nice() -> i32 {
    #[cfg(target_os = "linux")]
    return rustix::process::getpriority_process(None).unwrap_or(0);
    #[cfg(not(target_os = "linux"))]
    0
}

/// Runs jobs until the pool is dropped.
fn worker(rx: &Mutex<Receiver<Job>>) {
    lower_priority(base_nice());
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        job();
    }
}

fn argon2(alg: Algorithm, version: Version, params: Params) -> Argon2<'static> {
    Argon2::new(alg, version, params)
}

/// Runs argon2 with this thread's reusable memory block.
fn raw_hash(a: &Argon2<'_>, params: &Params, pw: &[u8], salt: &[u8], out: &mut [u8]) -> bool {
    MEMORY.with(|m| {
        let mut blocks = m.borrow_mut();
        let need = params.block_count();
        if blocks.len() != need {
            blocks.clear();
            blocks.resize(need, Block::default());
        }
        a.hash_password_into_with_memory(pw, salt, out, &mut blocks[..]).is_ok()
    })
}

/// Hashes on the calling thread (used by the workers and for the dummy hash).
pub fn hash_blocking(hp: &HashParams, pw: &[u8]) -> String {
    let params = hp.argon2_params().unwrap_or_default();
    let a = argon2(Algorithm::Argon2id, Version::V0x13, params.clone());
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf).unwrap_or(&[]).to_vec();
    let mut out = [0u8; 32];
    raw_hash(&a, &params, pw, &salt_bytes, &mut out);
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        b64.encode(&salt_bytes),
        b64.encode(out)
    )
}

/// Verifies on the calling thread in constant time; a malformed hash never matches.
pub fn verify_blocking(pw: &[u8], phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(alg) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = parsed.version.and_then(|v| Version::try_from(v).ok()).unwrap_or(Version::V0x13);
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let expected = expected.as_bytes();
    let mut out = vec![0u8; expected.len()];
    let a = argon2(alg, version, params.clone());
    raw_hash(&a, &params, pw, salt, &mut out) && bool::from(out.as_slice().ct_eq(expected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    const CHEAP: HashParams = HashParams { m: 64, t: 1, p: 1 };

    #[test]
    fn params_parse_from_the_contract_format() {
        let p: HashParams = "argon2id:m=19456,t=2,p=1".parse().unwrap();
        assert_eq!(p, HashParams { m: 19456, t: 2, p: 1 });
        assert!("bcrypt:12".parse::<HashParams>().is_err());
        assert!("argon2id:m=1,t=1,p=1".parse::<HashParams>().is_err());
        assert!("argon2id:m=64,t=1".parse::<HashParams>().is_err());
    }

    #[test]
    fn our_phc_strings_verify_with_the_reference_implementation() {
        let phc = hash_blocking(&CHEAP, b"hunter2hunter2");
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(Argon2::default().verify_password(b"hunter2hunter2", &parsed).is_ok());
        assert!(verify_blocking(b"hunter2hunter2", &phc));
        assert!(!verify_blocking(b"hunter3hunter3", &phc));
        assert!(!verify_blocking(b"x", "not a hash"));
    }

    #[tokio::test]
    async fn the_pool_verifies_with_each_hash_its_own_parameters() {
        let h = PasswordHasher::start(CHEAP, 1, 4);
        let pw = SecretString::from("correct horse");
        let phc = h.hash(h.admit().unwrap(), &pw).await.unwrap();
        assert!(h.verify(h.admit().unwrap(), &pw, Some(&phc), &Abandoned::default()).await.unwrap());
        assert!(!h
            .verify(h.admit().unwrap(), &SecretString::from("wrong"), Some(&phc), &Abandoned::default())
            .await
            .unwrap());
        let old = hash_blocking(&HashParams { m: 128, t: 1, p: 1 }, b"correct horse");
        assert!(
            h.verify(h.admit().unwrap(), &pw, Some(&old), &Abandoned::default()).await.unwrap(),
            "older parameters still verify"
        );
        assert!(
            !h.verify(h.admit().unwrap(), &pw, None, &Abandoned::default()).await.unwrap(),
            "the dummy never matches"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_threads_run_niced_below_the_thread_that_started_them() {
        let mine = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let h = PasswordHasher::start(CHEAP, 1, 4);
        let theirs = h
            .run(h.admit().unwrap(), None, || {
                rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
            })
            .await
            .unwrap();
        assert_eq!(theirs, (mine + HASH_NICE).min(19));
        assert!(theirs > mine || mine == 19);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let h = PasswordHasher::start(HashParams { m: 8192, t: 3, p: 1 }, 1, 1);
        let pw = SecretString::from("some password");
        let results = futures_join(&h, &pw, 8).await;
        assert!(results.iter().any(|r| r.is_err()), "some of 8 jobs on 1 worker + 1 slot must be refused");
        assert!(results.iter().any(|r| r.is_ok()));
    }

    #[tokio::test]
    async fn a_job_whose_caller_left_while_it_waited_is_not_run() {
        let h = PasswordHasher::start(CHEAP, 1, 4);
        // The one worker is held until `release` is sent.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, is_started) = tokio::sync::oneshot::channel();
        let h2 = h.clone();
        let holding = tokio::spawn(async move {
            h2.run(h2.admit().unwrap(), None, move || {
                let _ = started.send(());
                let _ = held.recv();
            })
            .await
        });
        is_started.await.unwrap();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let left = h.run(h.admit().unwrap(), None, move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
        // Queued, then dropped: the caller went away.
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), left).await.is_err());
        assert_eq!(h.in_flight(), 2, "the job left behind keeps its place until the worker reaches it");
        release.send(()).unwrap();
        holding.await.unwrap().unwrap();
        // The next job runs after the dropped one was reached.
        assert!(h.run(h.admit().unwrap(), None, || true).await.unwrap());
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the abandoned job must not run");
        assert_eq!(h.in_flight(), 0, "its place was given back");
    }

    #[tokio::test]
    async fn a_job_whose_request_was_abandoned_while_it_waited_is_skipped_but_a_started_one_ends() {
        let h = PasswordHasher::start(CHEAP, 1, 4);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, is_started) = tokio::sync::oneshot::channel();
        let started_first = Abandoned::default();
        let (h2, r2) = (h.clone(), started_first.clone());
        let holding = tokio::spawn(async move {
            h2.run(h2.admit().unwrap(), Some(r2), move || {
                let _ = started.send(());
                let _ = held.recv();
                "ended"
            })
            .await
        });
        is_started.await.unwrap();
        let queued = Abandoned::default();
        let (h3, q3) = (h.clone(), queued.clone());
        let waiting = tokio::spawn(async move { h3.run(h3.admit().unwrap(), Some(q3), || "ran").await });
        // The second job waits in the queue (its place is taken and its job sent in one
        // poll of its task).
        while h.in_flight() < 2 {
            tokio::task::yield_now().await;
        }
        // Both requests are given up; their callers (the use cases' tasks) still wait.
        let (mark_started, mark_queued) = (started_first.on_drop(), queued.on_drop());
        drop((mark_started, mark_queued));
        assert!(started_first.is_set() && queued.is_set());
        release.send(()).unwrap();
        assert_eq!(holding.await.unwrap(), Ok("ended"), "a started job ends and answers");
        assert_eq!(waiting.await.unwrap(), Err(Overloaded), "a waiting job of an abandoned request is skipped");
        assert_eq!(h.in_flight(), 0);
    }

    async fn futures_join(h: &PasswordHasher, pw: &SecretString, n: usize) -> Vec<Result<bool, Overloaded>> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (h, pw) = (h.clone(), pw.clone());
            set.spawn(async move {
                let permit = h.admit()?;
                h.verify(permit, &pw, None, &Abandoned::default()).await
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
        out
    }
}
