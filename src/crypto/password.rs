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
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        // A worker whose standing must change is replaced by a new thread, started by
        // one that keeps the caller's scheduling (see `worker`); it ends when every
        // worker has.
        let (respawn, respawns) = channel::<Replace>();
        for i in 0..workers {
            spawn_worker(Arc::clone(&rx), respawn.clone(), i, Standing::Idle);
        }
        drop(respawn);
        let pool = Arc::clone(&rx);
        let replacer = std::thread::Builder::new().name("gatehouse-hash-replacer".into()).spawn(move || {
            for Replace { slot, standing, respawn } in respawns {
                spawn_worker(Arc::clone(&pool), respawn, slot, standing);
            }
        });
        if let Err(e) = replacer {
            tracing::error!(error = %e, "could not start the hashing threads' replacer");
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
            }),
        }
    }

    /// Jobs queued or running now.
    pub fn in_flight(&self) -> usize {
        self.inner.capacity - self.inner.admission.available_permits()
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
        let params = self.inner.params;
        let pw = password.expose_secret().as_bytes().to_vec();
        self.run(permit, move || hash_blocking(&params, &pw)).await
    }

    /// Checks `password` against `stored`, or against a dummy hash of equal cost when
    /// there is none, so that unknown users take as long as known ones. A stored hash
    /// keeps the parameters it was made with: it verifies with them.
    pub async fn verify(
        &self,
        permit: HashPermit,
        password: &SecretString,
        stored: Option<&str>,
    ) -> Result<bool, Overloaded> {
        let pw = password.expose_secret().as_bytes().to_vec();
        let real = stored.is_some();
        let phc = stored.unwrap_or(&self.inner.dummy).to_owned();
        self.run(permit, move || verify_blocking(&pw, &phc) && real).await
    }

    async fn run<T: Send + 'static>(
        &self,
        permit: HashPermit,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Overloaded> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let job: Job = Box::new(move || {
            // A request dropped while its job waited (its client went away, or timed
            // out under overload) wants no answer: its hash would only delay the
            // queued ones behind it.
            if reply.is_closed() {
                drop(permit);
                return;
            }
            let _g = span.enter();
            let out = f();
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
/// `nice` value added, up to 19).
pub const HASH_NICE: i32 = 10;

/// How a hashing thread shares the cores with the rest of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// `SCHED_IDLE` (Linux): it runs only when nothing else on its core can, and the
    /// scheduler counts a core running only such threads as free, so a woken runtime or
    /// database thread goes there at once. (Niced only, a PostgreSQL process waited
    /// 86 ms to run while both hashing threads took 3 ms turns on both cores: `perf
    /// sched timehist` of the bench's overload phase, 2026-12-07.)
    Idle,
    /// Ordinary scheduling, [`HASH_NICE`] lower: a share of the cores even when every
    /// core is busy. Taken while the thread is starved (see [`next_standing`]).
    Niced,
}

/// A hash that took this many times its CPU time in wall time starved: the thread had a
/// core for less than half of it.
const STARVED: u32 = 2;

/// A hash that took less than this many times its CPU time ran at nearly full speed.
const FED: f64 = 1.25;

/// A niced thread goes back to the idle class after this many such hashes in a row (the
/// margin keeps threads from flapping between the two, each change costing a new thread
/// and the first touch of its memory block).
const FED_IN_A_ROW: u32 = 8;

/// Jobs shorter than this (in wall time) say nothing about starvation.
const JUDGED_FROM: Duration = Duration::from_millis(2);

/// The standing for the next job, from the last one's wall time and CPU time and, for
/// a niced thread, how many hashes in a row ran at nearly full speed (`fed_in_a_row`,
/// kept up to date here). A saturated service gives its hashing threads nearly every
/// cycle (a hash takes little more wall time than CPU time) and they stay idle-class. A
/// flood of cheap requests that keeps every core busy would starve an idle-class thread
/// (21 and 8 logins in 5 s against 53 and 59 niced, `wrk -c64` login flood on
/// PostgreSQL, 2026-12-07): a thread that starved is replaced by a niced one, which is
/// replaced by an idle-class one once its hashes run at nearly full speed again.
pub fn next_standing(now: Standing, fed_in_a_row: &mut u32, wall: Duration, cpu: Duration) -> Standing {
    // A job too short to tell (a malformed stored hash fails at once) changes nothing.
    if wall < JUDGED_FROM {
        return now;
    }
    match now {
        Standing::Idle if wall > cpu * STARVED => Standing::Niced,
        Standing::Idle => Standing::Idle,
        Standing::Niced => {
            let fed = wall.as_secs_f64() < cpu.as_secs_f64() * FED;
            *fed_in_a_row = if fed { *fed_in_a_row + 1 } else { 0 };
            if *fed_in_a_row >= FED_IN_A_ROW {
                Standing::Idle
            } else {
                Standing::Niced
            }
        }
    }
}

/// Takes `standing` for this new thread, which has its starter's scheduling (Linux;
/// elsewhere a no-op). The nice value is `base_nice` plus [`HASH_NICE`] in either.
fn take_standing(standing: Standing, base_nice: i32) {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            set_thread_priority_and_policy, thread_native_id, thread_schedule_policy, NormalThreadSchedulePolicy,
            ThreadSchedulePolicy,
        };
        if standing == Standing::Idle {
            let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
            // The crate also sets the nice value the idle class reports (0), which fails
            // where this thread's is above it and it may not lower it; the policy is
            // what matters, so it is read back.
            let set = set_thread_priority_and_policy(thread_native_id(), thread_priority::ThreadPriority::Min, idle);
            if thread_schedule_policy().ok() != Some(idle) {
                tracing::warn!(error = ?set.err(), "could not put a hashing thread in the idle class");
            }
        }
        let nice = (base_nice + HASH_NICE).min(19);
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
            tracing::warn!(error = %e, "could not lower the priority of a hashing thread");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (standing, base_nice);
}

/// This thread's CPU time so far (Linux; elsewhere zero, which keeps the standing).
fn thread_cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(u64::try_from(t.tv_sec).unwrap_or(0), u32::try_from(t.tv_nsec).unwrap_or(0))
    }
    #[cfg(not(target_os = "linux"))]
    Duration::ZERO
}

/// This thread's nice value (Linux; elsewhere 0).
fn base_nice() -> i32 {
    #[cfg(target_os = "linux")]
    return rustix::process::getpriority_process(None).unwrap_or(0);
    #[cfg(not(target_os = "linux"))]
    0
}

/// A worker's request to be replaced by one of the other standing.
struct Replace {
    slot: usize,
    standing: Standing,
    respawn: Sender<Replace>,
}

fn spawn_worker(rx: Arc<Mutex<Receiver<Job>>>, respawn: Sender<Replace>, slot: usize, standing: Standing) {
    let spawned = std::thread::Builder::new()
        .name(format!("gatehouse-hash-{slot}"))
        .spawn(move || worker(&rx, respawn, slot, standing));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start a hashing thread");
    }
}

/// Runs jobs in `standing` until [`next_standing`] says otherwise, then hands its place
/// to a new thread of the other standing and ends. (An unprivileged thread may enter
/// the idle class but not leave it, nor lower its nice value: Linux wants
/// `CAP_SYS_NICE` or a `RLIMIT_NICE` that allows it. A new thread, started by the
/// replacer, which never changed its own scheduling, needs neither.)
fn worker(rx: &Mutex<Receiver<Job>>, respawn: Sender<Replace>, slot: usize, standing: Standing) {
    // The nice value this thread was started with (its starter's).
    let base = base_nice();
    take_standing(standing, base);
    let mut fed_in_a_row = 0;
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            match guard.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let (wall, cpu) = (Instant::now(), thread_cpu_time());
        job();
        let (wall, cpu) = (wall.elapsed(), thread_cpu_time().saturating_sub(cpu));
        let next = next_standing(standing, &mut fed_in_a_row, wall, cpu);
        if next != standing {
            // The memory block goes first, so that the pool never holds more than one
            // per worker; the new thread makes its own.
            MEMORY.with(|m| *m.borrow_mut() = Vec::new());
            let _ = respawn.send(Replace { slot, standing: next, respawn: respawn.clone() });
            return;
        }
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
        assert!(h.verify(h.admit().unwrap(), &pw, Some(&phc)).await.unwrap());
        assert!(!h.verify(h.admit().unwrap(), &SecretString::from("wrong"), Some(&phc)).await.unwrap());
        let old = hash_blocking(&HashParams { m: 128, t: 1, p: 1 }, b"correct horse");
        assert!(h.verify(h.admit().unwrap(), &pw, Some(&old)).await.unwrap(), "older parameters still verify");
        assert!(!h.verify(h.admit().unwrap(), &pw, None).await.unwrap(), "the dummy never matches");
    }

    #[cfg(target_os = "linux")]
    fn standing_here() -> (Standing, i32) {
        use thread_priority::unix::{thread_schedule_policy, NormalThreadSchedulePolicy, ThreadSchedulePolicy};
        let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        match thread_schedule_policy().unwrap() {
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle) => (Standing::Idle, nice),
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other) => (Standing::Niced, nice),
            other => panic!("unexpected policy {other:?}"),
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_threads_start_idle_class_and_niced_below_the_thread_that_started_them() {
        let mine = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let h = PasswordHasher::start(CHEAP, 1, 4);
        let (standing, theirs) = h.run(h.admit().unwrap(), standing_here).await.unwrap();
        assert_eq!(standing, Standing::Idle);
        assert_eq!(theirs, (mine + HASH_NICE).min(19));
        assert!(theirs > mine || mine == 19);
    }

    /// A job that waited on the CPU far longer than it ran (here: it slept) has its
    /// thread replaced by a niced one; one that ran at full speed, by an idle-class one.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_starved_hashing_thread_takes_the_niced_standing_until_it_runs_at_full_speed() {
        let h = PasswordHasher::start(CHEAP, 1, 4);
        let starve = || std::thread::sleep(Duration::from_millis(30));
        let spin = || {
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(30) {
                std::hint::black_box(0u64);
            }
        };
        let tid = || rustix::thread::gettid();
        let first = h.run(h.admit().unwrap(), tid).await.unwrap();
        h.run(h.admit().unwrap(), starve).await.unwrap();
        let (standing, nice) = h.run(h.admit().unwrap(), standing_here).await.unwrap();
        assert_eq!(standing, Standing::Niced);
        assert_ne!(h.run(h.admit().unwrap(), tid).await.unwrap(), first, "a new thread, not the idle-class one");
        assert_eq!(nice, (base_nice() + HASH_NICE).min(19), "niced as before");
        // After enough spins at full speed in a row (a spin this machine starved starts
        // the row again).
        let mut back = Standing::Niced;
        for _ in 0..40 {
            h.run(h.admit().unwrap(), spin).await.unwrap();
            back = h.run(h.admit().unwrap(), standing_here).await.unwrap().0;
            if back == Standing::Idle {
                break;
            }
        }
        assert_eq!(back, Standing::Idle);
    }

    #[test]
    fn the_standing_follows_how_much_of_a_core_the_last_hashes_had() {
        let ms = Duration::from_millis;
        let mut fed = 0;
        assert_eq!(next_standing(Standing::Idle, &mut fed, ms(25), ms(24)), Standing::Idle);
        assert_eq!(next_standing(Standing::Idle, &mut fed, ms(45), ms(24)), Standing::Idle, "half a core is enough");
        assert_eq!(next_standing(Standing::Idle, &mut fed, ms(50), ms(24)), Standing::Niced);
        assert_eq!(next_standing(Standing::Idle, &mut fed, ms(1), Duration::ZERO), Standing::Idle, "too short to tell");
        // Niced: back after FED_IN_A_ROW hashes at nearly full speed in a row, not before.
        for _ in 1..FED_IN_A_ROW {
            assert_eq!(next_standing(Standing::Niced, &mut fed, ms(29), ms(24)), Standing::Niced);
        }
        assert_eq!(next_standing(Standing::Niced, &mut fed, ms(32), ms(24)), Standing::Niced, "not at full speed");
        assert_eq!(fed, 0, "the row starts again");
        for _ in 1..FED_IN_A_ROW {
            assert_eq!(next_standing(Standing::Niced, &mut fed, ms(29), ms(24)), Standing::Niced);
        }
        assert_eq!(next_standing(Standing::Niced, &mut fed, ms(29), ms(24)), Standing::Idle);
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
            h2.run(h2.admit().unwrap(), move || {
                let _ = started.send(());
                let _ = held.recv();
            })
            .await
        });
        is_started.await.unwrap();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let left = h.run(h.admit().unwrap(), move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
        // Queued, then dropped: the caller went away.
        assert!(tokio::time::timeout(Duration::from_millis(50), left).await.is_err());
        assert_eq!(h.in_flight(), 2, "the job left behind keeps its place until the worker reaches it");
        release.send(()).unwrap();
        holding.await.unwrap().unwrap();
        // The next job runs after the dropped one was reached.
        assert!(h.run(h.admit().unwrap(), || true).await.unwrap());
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the abandoned job must not run");
        assert_eq!(h.in_flight(), 0, "its place was given back");
    }

    async fn futures_join(h: &PasswordHasher, pw: &SecretString, n: usize) -> Vec<Result<bool, Overloaded>> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (h, pw) = (h.clone(), pw.clone());
            set.spawn(async move {
                let permit = h.admit()?;
                h.verify(permit, &pw, None).await
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
        out
    }
}
