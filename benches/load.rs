//! The load benchmark: `cargo bench --bench load`.
//!
//! Builds in release (cargo bench does), starts `gatehouse serve` on 127.0.0.1 with a
//! fresh SQLite database (and PostgreSQL too when GATEHOUSE_BENCH_POSTGRES_URL is set),
//! seeds users, and drives it with the closed- and open-loop load generator below,
//! each phase bounded in time. Every figure is reported next to a baseline measured in
//! the same run: the raw argon2id verify rate on the same cores for logins, and a
//! minimal axum handler served by the same binary for `/v1/me`, refresh and logout (by
//! two processes for the run with two instances, the load spread alike). Logout ends
//! a session and answers only once every instance has acknowledged it (on
//! PostgreSQL), so its rate is that of the acknowledgements under a burst. It prints a
//! table and writes `target/bench/results.json` and `target/bench/results.svg`.
//!
//! The load generator shares the machine's cores with the server, as it does with
//! the minimal handler, so those ratios compare like with like. The raw-hash baseline
//! runs no client: the login phase's client is the leanest (see [`login_loop`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");
const PASSWORD: &str = "correct horse battery staple";
const HASH: &str = "argon2id:m=19456,t=2,p=1";
/// The logout phase's users' hash: their sessions are made by logins that cost next to
/// nothing to check (a stored hash verifies with its own parameters), so that thousands
/// can be made before each slice.
const CHEAP_HASH: &str = "argon2id:m=8,t=1,p=1";
/// The logout phase's first slice gets this many sessions; each later one half as many
/// again as the slice before it ended. A slice that runs out of sessions is not counted
/// (and the next gets twice as many).
const FIRST_LOGOUTS: usize = 2500;
/// Each phase and its baseline alternate in this many slices. (With three, two runs of
/// the same code gave login / raw hash 0.88 and 0.83 on SQLite, 0.86 and 0.90 on
/// PostgreSQL: other guests take this machine's cores for seconds at a time.)
const ROUNDS: u32 = 5;
/// Logins and raw hashes alternate in this many slices per second of
/// GATEHOUSE_BENCH_SECONDS. Their rates are the noisiest: a verify takes 20-35 ms here,
/// the raw hash rate measured 72-93 /s in twelve one-second slices in a row
/// (2026-12-07), and five slices each gave ratios from 0.83 to 1.00 for the same code
/// (2026-12-06, seventh session).
const LOGIN_ROUNDS_PER_SECOND: u32 = 3;
/// A login slice counts only what is answered after this: the queue of 16 logins is
/// full and both hashing threads busy by then.
const LOGIN_WARM_UP: Duration = Duration::from_millis(200);
/// A raw hash slice counts only what ends after this (a verify or two per thread).
const HASH_WARM_UP: Duration = Duration::from_millis(100);

/// The part of a slice whose answers count: from `warm` after its start, for `len`.
/// The slice's rate is what ended within it over `len`. Neither its start (requests
/// not yet queued, threads not yet busy) nor its end (the last requests draining, one
/// hashing thread idle while the other finishes) counts: each ramp lasts up to a
/// verify or two of each thread, 20-70 ms of a slice of one or two seconds.
#[derive(Clone, Copy)]
struct Window {
    warm: Duration,
    len: Duration,
}

impl Window {
    fn plain(len: Duration) -> Self {
        Self { warm: Duration::ZERO, len }
    }
    /// When no new request may start.
    fn end(self) -> Duration {
        self.warm + self.len
    }
    /// Whether an answer at `t` after the start counts.
    fn counts(self, t: Duration) -> bool {
        t >= self.warm && t < self.end()
    }
}

fn secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// User + system CPU seconds in a `/proc` stat file (a process's counts its ended
/// threads too).
fn stat_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are 14 and 15.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
    // USER_HZ
}

/// CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds of the threads of process `pid` whose name starts with `prefix`.
fn thread_cpu_seconds(pid: u32, prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .map(|t| stat_seconds(&t.path().join("stat").to_string_lossy()))
        .sum()
}

/// CPU seconds of every PostgreSQL process on this machine (0 where there are none).
fn postgres_cpu_seconds() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0.0 };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(cpu_seconds)
        .sum()
}

/// Where the machine's CPU went during a phase: the servers' hashing threads, their
/// other threads, this load generator and PostgreSQL, in CPU seconds.
#[derive(Default, Clone, Copy)]
struct Cpu {
    hash: f64,
    other: f64,
    loadgen: f64,
    postgres: f64,
}

impl Cpu {
    fn now(servers: &[Server]) -> Self {
        let ids = servers.iter().map(|s| s.child.id());
        let hash: f64 = ids.clone().map(|id| thread_cpu_seconds(id, "gatehouse-hash")).sum();
        Self {
            hash,
            other: ids.map(cpu_seconds).sum::<f64>() - hash,
            loadgen: cpu_seconds(std::process::id()),
            postgres: postgres_cpu_seconds(),
        }
    }
    fn since(self, before: Self) -> Self {
        Self {
            hash: self.hash - before.hash,
            other: self.other - before.other,
            loadgen: self.loadgen - before.loadgen,
            postgres: self.postgres - before.postgres,
        }
    }
    fn add(&mut self, o: Self) {
        self.hash += o.hash;
        self.other += o.other;
        self.loadgen += o.loadgen;
        self.postgres += o.postgres;
    }
    /// Hashing's share of all the CPU measured: what a login could reach of the raw
    /// hash rate if every hash ran as fast as the baseline's. Steadier than the rate
    /// itself, which moves with the machine's speed.
    fn hash_share(&self) -> f64 {
        self.hash / (self.hash + self.other + self.loadgen + self.postgres).max(f64::MIN_POSITIVE)
    }
    /// Microseconds per request of each part.
    fn per_request(&self, requests: u64) -> Value {
        let us = |s: f64| s * 1e6 / requests.max(1) as f64;
        json!({"hash_us": us(self.hash), "server_other_us": us(self.other),
               "loadgen_us": us(self.loadgen), "postgres_us": us(self.postgres)})
    }
}

/// A phase run with the CPU it took added to `cpu`.
async fn measured(servers: &[Server], cpu: &mut Cpu, run: impl std::future::Future<Output = Sample>) -> Sample {
    let before = Cpu::now(servers);
    let sample = run.await;
    cpu.add(Cpu::now(servers).since(before));
    sample
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn env_cmd(db: &str, data: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEHOUSE_DATABASE_URL", db)
        .env("GATEHOUSE_DATA_DIR", data)
        .env("GATEHOUSE_PASSWORD_HASH", HASH)
        .env("GATEHOUSE_RATE_LIMIT_PER_IP", "0")
        // No device limit: the phases need more live sessions per user than the default
        // 2 (32 refresh chains of 8 users, thousands of sessions for the logout phase),
        // so a login evicts nothing here.
        .env("GATEHOUSE_DEVICE_LIMIT", "0")
        // Lockout off for the timing samples (wrong passwords on one account).
        .env("GATEHOUSE_LOCKOUT_TIERS", "1000000000:1")
        .env("GATEHOUSE_LOCKOUT_HARD_LIMIT", "0")
        .env("GATEHOUSE_MAIL_TRANSPORT", "log")
        .env("GATEHOUSE_LOG", "error");
    c
}

async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not come up");
}

/// A server on `db`; `hash_workers` its hashing threads (default: one per core).
async fn start(db: &str, data: &Path, hash_workers: Option<usize>) -> Server {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = env_cmd(db, data);
    if let Some(n) = hash_workers {
        cmd.env("GATEHOUSE_HASH_WORKERS", n.to_string());
    }
    let child = cmd.env("GATEHOUSE_LISTEN", &listen).arg("serve").stdout(Stdio::null()).spawn().unwrap();
    let s = Server { child, base: format!("http://{listen}") };
    wait_ready(&format!("{}/readyz", s.base)).await;
    s
}

async fn start_minimal() -> Server {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(BIN).args(["bench-minimal", "--listen", &listen]).stdout(Stdio::null()).spawn().unwrap();
    let s = Server { child, base: format!("http://{listen}") };
    wait_ready(&format!("{}/", s.base)).await;
    s
}

fn seed(db: &str, data: &Path, email: &str, hash: &str) {
    let mut child = env_cmd(db, data)
        .env("GATEHOUSE_PASSWORD_HASH", hash)
        .args(["user", "create", "--email", email, "--password-stdin", "--verified"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(PASSWORD.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

/// Latencies in microseconds, and status counts.
#[derive(Default)]
struct Sample {
    lat: Vec<u64>,
    ok: u64,
    other: u64,
    elapsed: f64,
    /// Every answer of the slice, counted or not (the CPU per request divides by it).
    answered: u64,
}

impl Sample {
    fn merge(&mut self, o: Sample) {
        self.lat.extend(o.lat);
        self.ok += o.ok;
        self.other += o.other;
        self.answered += o.answered;
    }
    /// Records an answer that came `at` after the slice's start, `lat` after its request.
    fn answer(&mut self, w: Window, at: Duration, ok: bool, lat: Duration) {
        self.answered += 1;
        if !w.counts(at) {
            return;
        }
        if ok {
            self.ok += 1;
            self.lat.push(lat.as_micros() as u64);
        } else {
            self.other += 1;
        }
    }
    /// Adds one slice of a phase measured in rounds: its requests and its time.
    fn absorb(&mut self, o: Sample) {
        self.elapsed += o.elapsed;
        self.merge(o);
    }
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed
    }
    /// NaN (null in the JSON) when nothing was answered: not a latency of 0.
    fn pct(&mut self, p: f64) -> f64 {
        if self.lat.is_empty() {
            return f64::NAN;
        }
        self.lat.sort_unstable();
        let i = ((self.lat.len() as f64 - 1.0) * p).round() as usize;
        self.lat[i] as f64 / 1000.0
    }
    fn summary(&mut self) -> Value {
        json!({"per_second": self.rate(), "ok": self.ok, "other": self.other,
               "p50_ms": self.pct(0.5), "p99_ms": self.pct(0.99), "p999_ms": self.pct(0.999)})
    }
}

type Req = Arc<dyn Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync>;

/// Closed loop: `conns` workers each send the next request when the last is answered,
/// until the window's end; the requests then in flight are awaited but not counted.
async fn closed_loop(conns: usize, w: Window, req: Req) -> Sample {
    let client = reqwest::Client::builder().pool_max_idle_per_host(conns).build().unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conns {
        let (client, req) = (client.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = Sample::default();
            while start.elapsed() < w.end() {
                let t = Instant::now();
                let ok = match req(&client, i).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                s.answer(w, start.elapsed(), ok, t.elapsed());
            }
            s
        }));
    }
    gather(tasks, w).await
}

/// The workers' samples merged into one slice of `w`.
async fn gather(tasks: Vec<tokio::task::JoinHandle<Sample>>, w: Window) -> Sample {
    let mut all = Sample::default();
    for t in tasks {
        all.merge(t.await.unwrap());
    }
    all.elapsed = w.len.as_secs_f64();
    all
}

/// The login phase's closed loop: one worker per `(base, body)`, each on its own
/// connection, posting its body to `/v1/auth/login` again as soon as the last is
/// answered; counted as [`closed_loop`] counts. Its client is hyper's connection-level
/// one, with each worker's body and host made once: the login ratio's baseline (raw hashes)
/// runs no client, so what the client costs on these shared cores counts against the
/// service alone. The bench's CPU per login (this client, its runtime and its reading
/// of `/proc` around each slice) was 0.14-0.17 ms with reqwest (its pool, URL parsing
/// and JSON per request) and 0.07-0.14 ms with this client (2026-12-07, seven runs;
/// wrk took about 0.05 ms for the same logins).
async fn login_loop(logins: Vec<(String, String)>, w: Window) -> Sample {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
    async fn connect(host: &str) -> Sender {
        let stream = tokio::net::TcpStream::connect(host).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        sender
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (base, body) in logins {
        tasks.push(tokio::spawn(async move {
            let host = base.trim_start_matches("http://").to_owned();
            let mut sender = connect(&host).await;
            let body = Bytes::from(body);
            let mut s = Sample::default();
            while start.elapsed() < w.end() {
                let req = hyper::Request::post("/v1/auth/login")
                    .header(hyper::header::HOST, &host)
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))
                    .unwrap();
                let t = Instant::now();
                // Ready first: the connection takes the next request only once it has
                // finished with the last answer.
                let answer = match sender.ready().await {
                    Ok(()) => sender.send_request(req).await,
                    Err(e) => Err(e),
                };
                let ok = match answer {
                    Ok(r) => {
                        let status = r.status();
                        r.into_body().collect().await.is_ok() && status.is_success()
                    }
                    Err(_) => false,
                };
                s.answer(w, start.elapsed(), ok, t.elapsed());
                if sender.is_closed() {
                    // Closed by the server (or failed): counted, and a new connection.
                    sender = connect(&host).await;
                }
            }
            s
        }));
    }
    gather(tasks, w).await
}

/// Raw argon2id verifies on every core, with the service's own verify: those that end
/// within the window.
fn raw_hash(w: Window) -> Sample {
    let phc = gatehouse::crypto::password::hash_blocking(&HASH.parse().unwrap(), PASSWORD.as_bytes());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (count, phc) = (count.clone(), phc.clone());
            s.spawn(move || {
                while start.elapsed() < w.end() {
                    assert!(gatehouse::crypto::password::verify_blocking(PASSWORD.as_bytes(), &phc));
                    if w.counts(start.elapsed()) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let ok = count.load(Ordering::Relaxed);
    Sample { ok, answered: ok, elapsed: w.len.as_secs_f64(), ..Sample::default() }
}

async fn login_tokens(base: &str, emails: &[String], per_user: usize) -> Vec<Value> {
    let c = reqwest::Client::new();
    let mut out = Vec::new();
    for e in emails {
        for _ in 0..per_user {
            let r = c
                .post(format!("{base}/v1/auth/login"))
                .json(&json!({"email": e, "password": PASSWORD}))
                .send()
                .await
                .unwrap();
            out.push(r.json::<Value>().await.unwrap());
        }
    }
    out
}

/// The overload phase: logins offered open-loop at `rate`/s while `/healthz` and
/// `/v1/me` are probed; returns the 503 share, rejection latency and probe p99s, and
/// writes every request to `trace` (CSV: what, when it was sent in Unix microseconds,
/// to set beside PostgreSQL's log, its latency, its status, which instance it went to,
/// counted from 0). Logins and each probe's
/// requests go to the instances in turn. `/v1/me` is probed twice: with `token`, a
/// session of the flooded email's user (each of whose logins changes the user; before
/// migration 0008 that made every instance forget the user's sessions, and the probe
/// read the database: the worst case), and with `other`, a session of a user nobody
/// floods (`/v1/me/other` in the trace).
async fn overload(
    bases: &[String],
    rate: f64,
    dur: Duration,
    email: &str,
    (token, other): (&str, &str),
    trace: &Path,
) -> Value {
    let t0 = Instant::now();
    let unix0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let sent_at = move |t: Instant| unix0 + t.duration_since(t0).as_micros();
    let client = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let probe = |path: &'static str, label: &'static str, bearer: Option<String>| {
        let (client, done, bases) = (client.clone(), done.clone(), bases.to_vec());
        tokio::spawn(async move {
            let (mut s, mut lines) = (Sample::default(), String::new());
            for i in 0.. {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                let mut r = client.get(format!("{}{path}", bases[i % bases.len()]));
                if let Some(b) = &bearer {
                    r = r.bearer_auth(b);
                }
                let status = r.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
                let lat = t.elapsed().as_micros() as u64;
                lines += &format!("{label},{},{lat},{status},{}\n", sent_at(t), i % bases.len());
                if (200..300).contains(&status) {
                    s.ok += 1;
                    s.lat.push(lat);
                } else {
                    s.other += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (s, lines)
        })
    };
    let health = probe("/healthz", "/healthz", None);
    let me = probe("/v1/me", "/v1/me", Some(token.to_owned()));
    let me_other = probe("/v1/me", "/v1/me/other", Some(other.to_owned()));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut sent = Vec::new();
    let mut next = Instant::now();
    while start.elapsed() < dur {
        let instance = sent.len() % bases.len();
        let (client, base, email) = (client.clone(), bases[instance].clone(), email.to_owned());
        sent.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client
                .post(format!("{base}/v1/auth/login"))
                .json(&json!({"email": email, "password": PASSWORD}))
                .send()
                .await;
            (r.map(|r| r.status().as_u16()).unwrap_or(0), t.elapsed().as_micros() as u64, sent_at(t), instance)
        }));
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let mut rejected = Sample::default();
    let (mut ok, mut total, mut lines) = (0u64, 0u64, String::new());
    for s in sent {
        let (status, micros, at, instance) = s.await.unwrap();
        lines += &format!("login,{at},{micros},{status},{instance}\n");
        total += 1;
        match status {
            503 => {
                rejected.ok += 1;
                rejected.lat.push(micros);
            }
            200 => ok += 1,
            _ => {}
        }
    }
    done.store(true, Ordering::Relaxed);
    let ((mut h, h_lines), (mut m, m_lines)) = (health.await.unwrap(), me.await.unwrap());
    let (mut mo, mo_lines) = me_other.await.unwrap();
    std::fs::write(
        trace,
        format!("request,sent_unix_us,latency_us,status,instance\n{lines}{h_lines}{m_lines}{mo_lines}"),
    )
    .unwrap();
    json!({
        "offered_per_second": rate,
        "logins_sent": total,
        "logins_ok": ok,
        "share_503": rejected.ok as f64 / total.max(1) as f64,
        "rejected_p50_ms": rejected.pct(0.5),
        "rejected_p99_ms": rejected.pct(0.99),
        "healthz_p99_ms": h.pct(0.99),
        "me_p99_ms": m.pct(0.99),
        "me_other_user_p99_ms": mo.pct(0.99),
        "probe_failures": h.other + m.other + mo.other,
    })
}

/// Median latencies (ms) of two kinds of request, `a` and `b`, interleaved in the order
/// a, b, b, a, ... The hashing threads take jobs that come one at a time in turn (the
/// one waiting on the queue's lock gets the next), so a strict alternation put every
/// `a` on one thread and every `b` on the other (seen in each thread's `schedstat`,
/// 2026-12-07): the figure compared the two threads (and mostly their cores) more than
/// the two paths. It measured up to 8.3% on SQLite that way; now each kind runs on each
/// thread half the time.
async fn paired_medians(
    samples: usize,
    status: u16,
    send: impl Fn(&reqwest::Client, bool, usize) -> reqwest::RequestBuilder,
) -> (f64, f64) {
    let c = reqwest::Client::new();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..samples * 2 {
        let is_a = matches!(i % 4, 0 | 3);
        let t = Instant::now();
        let r = send(&c, is_a, i).send().await.unwrap();
        assert_eq!(r.status(), status);
        let _ = r.bytes().await;
        let us = t.elapsed().as_micros() as u64;
        if is_a {
            a.push(us)
        } else {
            b.push(us)
        }
    }
    let med = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1000.0
    };
    (med(&mut a), med(&mut b))
}

/// What an observer could tell from the time of an answer: unknown-email against
/// wrong-password logins, and registrations of a new email against a taken one (the
/// same 202 either way).
async fn timing(base: &str, known: &str, samples: usize) -> Value {
    let (mu, mw) = paired_medians(samples, 401, |c, unknown, i| {
        let email = if unknown { format!("nobody{i}@example.com") } else { known.to_owned() };
        c.post(format!("{base}/v1/auth/login")).json(&json!({"email": email, "password": "wrong password"}))
    })
    .await;
    let (rn, rt) = paired_medians(samples, 202, |c, new, i| {
        let email = if new { format!("newcomer{i}@example.com") } else { known.to_owned() };
        c.post(format!("{base}/v1/auth/register")).json(&json!({"email": email, "password": "a fine long passphrase"}))
    })
    .await;
    let share = |x: f64, y: f64| (x - y).abs() / x.max(y);
    json!({"samples_each": samples, "unknown_email_median_ms": mu, "wrong_password_median_ms": mw,
           "difference": share(mu, mw), "register_new_median_ms": rn, "register_taken_median_ms": rt,
           "register_difference": share(rn, rt)})
}

/// One run against the minimal handler (the framework's ceiling), served by as many
/// processes as the phases it is compared with, the load spread the same way.
async fn minimal_run(bases: &[String], d: Window) -> Sample {
    let b = bases.to_vec();
    closed_loop(32, d, Arc::new(move |c, w| c.get(format!("{}/", b[w % b.len()])))).await
}

/// Where profiles go: set when this run profiles (GATEHOUSE_BENCH_PROFILE=1 and perf).
fn profile_dir() -> Option<PathBuf> {
    let wanted = std::env::var("GATEHOUSE_BENCH_PROFILE").is_ok_and(|v| v == "1");
    let has_perf = Command::new("perf").arg("--version").output().is_ok_and(|o| o.status.success());
    wanted.then(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/profiles")).filter(|_| has_perf)
}

/// Samples stacks with perf while `phase` runs, those of process `pid` or, without one,
/// of the whole machine (PostgreSQL's processes and the load generator too), then keeps
/// a text report of where the time went (`<name>.txt`, functions by share of samples)
/// and a flame graph (`<name>.svg`).
async fn profiled<T>(pid: Option<u32>, name: &str, d: Duration, phase: impl std::future::Future<Output = T>) -> T {
    let Some(dir) = profile_dir() else { return phase.await };
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join(format!("{name}.data"));
    let target = pid.map_or_else(|| vec!["-a".to_owned()], |pid| vec!["-p".to_owned(), pid.to_string()]);
    let rec = Command::new("perf")
        .args(["record", "-F", "499", "-g", "-q"])
        .args(&target)
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep", &(d.as_secs().max(1) + 1).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    // perf takes a moment to attach: a phase started at once was sometimes not sampled
    // at all (an empty profile of /healthz on 2026-12-06).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = phase.await;
    if let Ok(mut rec) = rec {
        let _ = rec.wait();
        if let Ok(report) = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-g", "none", "--percent-limit", "0.5", "-i"])
            .arg(&data)
            .output()
        {
            std::fs::write(dir.join(format!("{name}.txt")), report.stdout).unwrap();
        }
        // A flame graph too, when inferno is installed (scripts/bench.sh installs it).
        let svg = dir.join(format!("{name}.svg"));
        let script = format!(
            "perf script -i '{}' | inferno-collapse-perf | inferno-flamegraph --title 'gatehouse {name}' > '{}'",
            data.display(),
            svg.display()
        );
        let made = Command::new("sh").args(["-c", &script]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !made {
            let _ = std::fs::remove_file(&svg);
        }
        let _ = std::fs::remove_file(&data);
    }
    out
}

/// One backend: `instances` servers on the same database, load spread over them.
/// With `full`, also the overload, timing and memory phases (on the first server); with
/// several instances, the overload phase spread over them.
async fn backend_run(
    name: &str,
    db: &str,
    data: &Path,
    instances: usize,
    full: bool,
    minimal: &[String],
    d: Duration,
) -> Value {
    let emails: Vec<String> = (0..8).map(|i| format!("user{i}@example.com")).collect();
    for e in &emails {
        seed(db, data, e, HASH);
    }
    let leaving: Vec<String> = (0..8).map(|i| format!("leaving{i}@example.com")).collect();
    for e in &leaving {
        seed(db, data, e, CHEAP_HASH);
    }
    // Instances sharing the machine share its cores for hashing, as the README advises
    // for such a deployment: together they run one hash per core, as the baseline does.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let hash_workers = (instances > 1).then(|| (cores / instances).max(1));
    let mut servers = Vec::new();
    for i in 0..instances {
        servers.push(start(db, &data.join(format!("i{i}")), hash_workers).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = servers[0].rss_kib("VmRSS:");
    let bases: Arc<Vec<String>> = Arc::new(servers.iter().map(|s| s.base.clone()).collect());
    let base = bases[0].clone();

    let tokens = login_tokens(&base, &emails, 4).await;
    let access: Arc<Vec<String>> =
        Arc::new(tokens.iter().map(|t| t["access_token"].as_str().unwrap().to_owned()).collect());
    let ctx = PhaseCtx {
        bases: bases.clone(),
        emails: Arc::new(emails.clone()),
        access: access.clone(),
        chains: tokio::sync::Mutex::new(Vec::new()),
        leaving: Arc::new(leaving),
        sessions: Arc::new(std::sync::Mutex::new(Vec::new())),
    };
    // Each figure is measured in rounds, alternating with its baseline, and the ratio is
    // of their totals: the speed of this machine drifts by up to 2x over minutes (other
    // guests take its cores), and alternating short slices puts both under the same drift.
    let slice = Window::plain(d / ROUNDS);
    let (mut minimal_s, mut healthz, mut me, mut refresh, mut logout) =
        (Sample::default(), Sample::default(), Sample::default(), Sample::default(), Sample::default());
    let (mut me_cpu, mut refresh_cpu, mut login_cpu, mut logout_cpu) =
        (Cpu::default(), Cpu::default(), Cpu::default(), Cpu::default());
    let (mut sessions_made, mut logout_slices_short) = (FIRST_LOGOUTS, 0);
    for _ in 0..ROUNDS {
        minimal_s.absorb(minimal_run(minimal, slice).await);
        healthz.absorb(run_phase(Phase::Healthz, &ctx, slice).await);
        me.absorb(measured(&servers, &mut me_cpu, run_phase(Phase::Me, &ctx, slice)).await);
        refresh.absorb(measured(&servers, &mut refresh_cpu, run_phase(Phase::Refresh, &ctx, slice)).await);
        make_sessions(&ctx, sessions_made).await;
        let mut cpu = Cpu::default();
        let sample = measured(&servers, &mut cpu, run_phase(Phase::Logout, &ctx, slice)).await;
        let left = std::mem::take(&mut *ctx.sessions.lock().unwrap()).len();
        if left == 0 {
            // It ran out of sessions before its end: not counted.
            logout_slices_short += 1;
            sessions_made *= 2;
        } else {
            logout.absorb(sample);
            logout_cpu.add(cpu);
            sessions_made = sessions_made.max((sessions_made - left) * 3 / 2);
        }
    }
    let (mut hash, mut login) = (Sample::default(), Sample::default());
    let login_rounds = LOGIN_ROUNDS_PER_SECOND * u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
    let (hash_window, login_window) =
        (Window { warm: HASH_WARM_UP, len: d / 10 }, Window { warm: LOGIN_WARM_UP, len: d / 5 });
    for _ in 0..login_rounds {
        hash.absorb(raw_hash(hash_window));
        login.absorb(measured(&servers, &mut login_cpu, run_phase(Phase::Login, &ctx, login_window)).await);
    }
    let (minimal_rate, hash_rate) = (minimal_s.rate(), hash.rate());
    let capacity = login.rate();
    let mut out = json!({
        "backend": name,
        "instances": instances,
        "rounds": ROUNDS,
        "login_rounds": login_rounds,
        "baselines": {
            "minimal": minimal_s.summary(),
            "raw_hash_per_second": hash_rate,
        },
        "login": login.summary(),
        "login_vs_raw_hash": capacity / hash_rate,
        "login_hash_share_of_cpu": login_cpu.hash_share(),
        "cpu_per_request": {
            "login": login_cpu.per_request(login.answered),
            "me": me_cpu.per_request(me.answered),
            "refresh": refresh_cpu.per_request(refresh.answered),
            "logout": logout_cpu.per_request(logout.answered),
        },
        "me": me.summary(),
        "me_vs_minimal": me.rate() / minimal_rate,
        "healthz": healthz.summary(),
        "me_vs_healthz": me.rate() / healthz.rate(),
        "refresh": refresh.summary(),
        "refresh_vs_minimal": refresh.rate() / minimal_rate,
        "logout": logout.summary(),
        "logout_vs_minimal": logout.rate() / minimal_rate,
        "logout_slices_not_counted": logout_slices_short,
    });
    if full || instances > 1 {
        // Every request of the phase, for a look at when the slow ones came.
        let suffix = if instances > 1 { format!("-{instances}") } else { String::new() };
        let trace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench/overload-{name}{suffix}.csv"));
        out["overload_4x"] =
            overload(&bases, capacity * 4.0, d * 2, &emails[0], (&access[0], &access[4]), &trace).await;
    }
    if full {
        out["timing"] = timing(&base, &emails[1], 200).await;
        out["rss_idle_mib"] = json!(idle_rss as f64 / 1024.0);
        out["rss_peak_mib"] = json!(servers[0].rss_kib("VmHWM:") as f64 / 1024.0);
        // Profiles come from separate, shorter runs: sampling slows the server down,
        // so no figure above was measured under it. On SQLite of the server; on
        // PostgreSQL of the whole machine, where PostgreSQL's share is the question.
        let (pid, prefix) = if name == "sqlite" { (Some(servers[0].child.id()), "") } else { (None, "postgres-") };
        let short = d.min(Duration::from_secs(3));
        let logouts = (logout.rate() * short.as_secs_f64() * 1.5) as usize;
        for (phase, label) in [
            (Phase::Healthz, "healthz"),
            (Phase::Me, "me"),
            (Phase::Refresh, "refresh"),
            (Phase::Logout, "logout"),
            (Phase::Login, "login"),
        ] {
            if matches!(phase, Phase::Logout) {
                make_sessions(&ctx, logouts).await;
            }
            profiled(pid, &format!("{prefix}{label}"), short, run_phase(phase, &ctx, Window::plain(short))).await;
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Phase {
    Healthz,
    Me,
    Refresh,
    Login,
    Logout,
}

struct PhaseCtx {
    bases: Arc<Vec<String>>,
    emails: Arc<Vec<String>>,
    access: Arc<Vec<String>>,
    /// The refresh chains' current tokens, carried from one slice to the next.
    chains: tokio::sync::Mutex<Vec<String>>,
    /// The logout phase's users (see [`CHEAP_HASH`]).
    leaving: Arc<Vec<String>>,
    /// Access tokens of the sessions the next logout slice ends, made before it.
    sessions: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Makes `n` sessions of the logout phase's users, 8 logins at a time on every instance
/// in turn, for the next logout slice.
async fn make_sessions(ctx: &PhaseCtx, n: usize) {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, next, bases, emails, sessions) =
            (client.clone(), next.clone(), ctx.bases.clone(), ctx.leaving.clone(), ctx.sessions.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = usize::try_from(next.fetch_add(1, Ordering::Relaxed)).unwrap();
                if i >= n {
                    break;
                }
                let r = client
                    .post(format!("{}/v1/auth/login", bases[i % bases.len()]))
                    .json(&json!({"email": emails[i % emails.len()], "password": PASSWORD}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "a logout user's login: {}", r.status());
                let v: Value = r.json().await.unwrap();
                sessions.lock().unwrap().push(v["access_token"].as_str().unwrap().to_owned());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// One closed-loop phase against every instance in turn, counted within `d`.
async fn run_phase(phase: Phase, ctx: &PhaseCtx, d: Window) -> Sample {
    let b = ctx.bases.clone();
    match phase {
        Phase::Healthz => closed_loop(32, d, Arc::new(move |c, w| c.get(format!("{}/healthz", b[w % b.len()])))).await,
        Phase::Me => {
            let a = ctx.access.clone();
            closed_loop(
                32,
                d,
                Arc::new(move |c, w| c.get(format!("{}/v1/me", b[w % b.len()])).bearer_auth(&a[w % a.len()])),
            )
            .await
        }
        Phase::Logout => {
            // Each request ends one session made before the slice, on an instance that
            // did not necessarily make it; with none left it sends no token (a 401, not
            // counted as answered).
            let sessions = ctx.sessions.clone();
            closed_loop(
                32,
                d,
                Arc::new(move |c, w| {
                    let token = sessions.lock().unwrap().pop().unwrap_or_default();
                    c.post(format!("{}/v1/auth/logout", b[w % b.len()])).bearer_auth(token)
                }),
            )
            .await
        }
        Phase::Login => {
            let logins = (0..16)
                .map(|w| {
                    let body = json!({"email": ctx.emails[w % ctx.emails.len()], "password": PASSWORD});
                    (b[w % b.len()].clone(), body.to_string())
                })
                .collect();
            login_loop(logins, d).await
        }
        Phase::Refresh => {
            // Each worker follows its own chain: the next token is the last answer's.
            // 32 chains (8 users, 4 sessions each): the concurrency of the baseline.
            let mut kept = ctx.chains.lock().await;
            if kept.is_empty() {
                *kept = login_tokens(&b[0], &ctx.emails, 4)
                    .await
                    .iter()
                    .map(|t| t["refresh_token"].as_str().unwrap().to_owned())
                    .collect();
            }
            let chains = std::mem::take(&mut *kept);
            let start = Instant::now();
            let client = reqwest::Client::new();
            let mut tasks = Vec::new();
            for (w, mut token) in chains.into_iter().enumerate() {
                let (client, bases) = (client.clone(), b.clone());
                tasks.push(tokio::spawn(async move {
                    let mut s = Sample::default();
                    while start.elapsed() < d.end() {
                        let t = Instant::now();
                        let url = format!("{}/v1/auth/refresh", bases[w % bases.len()]);
                        let r = client.post(url).json(&json!({"refresh_token": token})).send().await.unwrap();
                        let ok = r.status().is_success();
                        if ok {
                            let v: Value = r.json().await.unwrap();
                            token = v["refresh_token"].as_str().unwrap().to_owned();
                        }
                        s.answer(d, start.elapsed(), ok, t.elapsed());
                    }
                    (s, token)
                }));
            }
            let mut all = Sample::default();
            for t in tasks {
                let (s, token) = t.await.unwrap();
                all.merge(s);
                kept.push(token);
            }
            all.elapsed = d.len.as_secs_f64();
            all
        }
    }
}

fn row(t: &mut String, k: &str, v: String) {
    t.push_str(&format!("  {k:<44} {v}\n"));
}

fn table(results: &Value) -> String {
    let mut t = String::new();
    // A latency with nothing answered is null: shown as such, not as 0.
    let f = |v: &Value| v.as_f64().map_or_else(|| "none".to_owned(), |x| format!("{x:.2}"));
    row(&mut t, "cores", results["cores"].to_string());
    for b in results["backends"].as_array().unwrap() {
        let n = b["backend"].as_str().unwrap();
        t.push_str(&format!("{n}, {} instance(s)\n", b["instances"]));
        let bl = &b["baselines"];
        row(&mut t, "baseline: raw argon2id verifies/s (all cores)", f(&bl["raw_hash_per_second"]));
        row(&mut t, "baseline: minimal handler req/s", f(&bl["minimal"]["per_second"]));
        for (k, path) in [
            ("login", "login"),
            ("GET /v1/me", "me"),
            ("refresh", "refresh"),
            ("logout", "logout"),
            ("/healthz", "healthz"),
        ] {
            let s = &b[path];
            row(
                &mut t,
                &format!("{k} req/s (p50 / p99 / p99.9 ms)"),
                format!("{} ({} / {} / {})", f(&s["per_second"]), f(&s["p50_ms"]), f(&s["p99_ms"]), f(&s["p999_ms"])),
            );
        }
        row(&mut t, "login / raw hash rate", f(&b["login_vs_raw_hash"]));
        row(&mut t, "login: hashing's share of the CPU used", f(&b["login_hash_share_of_cpu"]));
        for phase in ["login", "me", "refresh", "logout"] {
            let c = &b["cpu_per_request"][phase];
            let parts = ["hash_us", "server_other_us", "loadgen_us", "postgres_us"].map(|k| f(&c[k]));
            row(&mut t, &format!("{phase} CPU µs: hash / server other / loadgen / pg"), parts.join(" / "));
        }
        row(&mut t, "me / minimal handler", f(&b["me_vs_minimal"]));
        row(&mut t, "me / healthz", f(&b["me_vs_healthz"]));
        row(&mut t, "refresh / minimal handler", f(&b["refresh_vs_minimal"]));
        row(
            &mut t,
            "logout / minimal handler",
            format!("{} (slices not counted: {})", f(&b["logout_vs_minimal"]), b["logout_slices_not_counted"]),
        );
        if let Some(o) = b.get("overload_4x") {
            row(&mut t, "4x overload: share 503", f(&o["share_503"]));
            row(&mut t, "4x overload: 503 answered p99 ms", f(&o["rejected_p99_ms"]));
            row(&mut t, "4x overload: /healthz p99 ms", f(&o["healthz_p99_ms"]));
            row(&mut t, "4x overload: /v1/me p99 ms (flooded user)", f(&o["me_p99_ms"]));
            row(&mut t, "4x overload: /v1/me p99 ms (another user)", f(&o["me_other_user_p99_ms"]));
        }
        if b.get("timing").is_none() {
            continue;
        }
        let tm = &b["timing"];
        row(
            &mut t,
            "median unknown / wrong-password ms",
            format!("{} / {}", f(&tm["unknown_email_median_ms"]), f(&tm["wrong_password_median_ms"])),
        );
        row(&mut t, "timing difference (share)", f(&tm["difference"]));
        row(
            &mut t,
            "median register new / taken email ms",
            format!("{} / {}", f(&tm["register_new_median_ms"]), f(&tm["register_taken_median_ms"])),
        );
        row(&mut t, "register timing difference (share)", f(&tm["register_difference"]));
        row(&mut t, "RSS idle / peak MiB", format!("{} / {}", f(&b["rss_idle_mib"]), f(&b["rss_peak_mib"])));
    }
    t
}

fn plot(results: &Value, path: &Path) {
    use plotters::prelude::*;
    let mut bars: Vec<(String, f64)> = Vec::new();
    for b in results["backends"].as_array().unwrap() {
        let n = format!("{} x{}", b["backend"].as_str().unwrap(), b["instances"]);
        for (label, key) in [
            ("login/hash", "login_vs_raw_hash"),
            ("me/minimal", "me_vs_minimal"),
            ("refresh/minimal", "refresh_vs_minimal"),
            ("logout/minimal", "logout_vs_minimal"),
        ] {
            bars.push((format!("{n} {label}"), b[key].as_f64().unwrap_or(0.0)));
        }
    }
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Gatehouse: throughput as a share of its baseline (same run)", ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(80)
        .y_label_area_size(50)
        .build_cartesian_2d(0..bars.len(), 0.0..max)
        .unwrap();
    chart
        .configure_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|i| bars.get(*i).map(|b| b.0.clone()).unwrap_or_default())
        .y_desc("ratio")
        .draw()
        .unwrap();
    chart
        .draw_series(
            bars.iter().enumerate().map(|(i, b)| Rectangle::new([(i, 0.0), (i + 1, b.1)], BLUE.mix(0.6).filled())),
        )
        .unwrap();
    root.present().unwrap();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and this is
    // no test: say so and leave.
    if !std::env::args().any(|a| a == "--bench") {
        println!("the load benchmark runs with `cargo bench --bench load`");
        return;
    }
    let d = secs("GATEHOUSE_BENCH_SECONDS", 5);
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // Two processes of the minimal handler: the baseline of the two-instance run has
        // the same shape as it (two processes sharing the cores).
        let minimal = [start_minimal().await, start_minimal().await];
        let (one, two) = (&[minimal[0].base.clone()][..], &[minimal[0].base.clone(), minimal[1].base.clone()][..]);
        let mut backends = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("bench.db").display());
        eprintln!("sqlite ...");
        backends.push(backend_run("sqlite", &sqlite, &dir.path().join("sqlite"), 1, true, one, d).await);
        if let Ok(pg) = std::env::var("GATEHOUSE_BENCH_POSTGRES_URL") {
            eprintln!("postgres, one instance ...");
            backends.push(backend_run("postgres", &pg, &dir.path().join("pg1"), 1, true, one, d).await);
            if let Ok(pg2) = std::env::var("GATEHOUSE_BENCH_POSTGRES_URL_2") {
                eprintln!("postgres, two instances ...");
                backends.push(backend_run("postgres", &pg2, &dir.path().join("pg2"), 2, false, two, d).await);
            }
        }
        let results = json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "seconds_per_phase": d.as_secs(),
            "password_hash": HASH,
            "backends": backends,
        });
        std::fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(&results).unwrap()).unwrap();
        plot(&results, &out_dir.join("results.svg"));
        println!("{}", table(&results));
        println!("written: {}", out_dir.join("results.json").display());
    });
}
