//! Real `gatehouse` processes: several instances sharing one PostgreSQL, the command
//! line, and durability across `kill -9`.
#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fresh_database, Backend};
use reqwest::StatusCode;
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery staple";
const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

/// A `gatehouse serve` process, killed when dropped.
struct Instance {
    child: Child,
    base: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn command(db: &str, data: &Path, extra: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEHOUSE_DATABASE_URL", db)
        .env("GATEHOUSE_DATA_DIR", data)
        .env("GATEHOUSE_PASSWORD_HASH", "argon2id:m=1024,t=1,p=1")
        .env("GATEHOUSE_RATE_LIMIT_PER_IP", "0")
        .env("GATEHOUSE_LOG", "warn");
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

async fn start(db: &str, data: &Path, extra: &[(&str, &str)]) -> Instance {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut c = command(db, data, extra);
    c.env("GATEHOUSE_LISTEN", &listen).arg("serve").stdout(Stdio::null()).stderr(Stdio::inherit());
    let instance = Instance { child: c.spawn().unwrap(), base: format!("http://{listen}") };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(format!("{}/readyz", instance.base)).send().await {
            if r.status() == StatusCode::OK {
                return instance;
            }
        }
        assert!(Instant::now() < deadline, "gatehouse did not become ready on {listen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn create_user(db: &str, data: &Path, email: &str, admin: bool, extra: &[(&str, &str)]) {
    let mut c = command(db, data, extra);
    c.args(["user", "create", "--email", email, "--password-stdin", "--verified"]);
    if admin {
        c.args(["--role", "admin"]);
    }
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "user create: {}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap();
    assert!(uuid::Uuid::parse_str(id.trim()).is_ok(), "prints the new id: {id}");
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> reqwest::Response {
    c.post(url).json(&body).send().await.unwrap()
}

async fn login(c: &reqwest::Client, base: &str, email: &str, pw: &str) -> reqwest::Response {
    post(c, format!("{base}/v1/auth/login"), json!({"email": email, "password": pw})).await
}

async fn me(c: &reqwest::Client, base: &str, token: &str) -> StatusCode {
    c.get(format!("{base}/v1/me")).bearer_auth(token).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "PostgreSQL: run with GATEHOUSE_TEST_POSTGRES_URL and --include-ignored (scripts/test.sh does)"]
async fn two_instances_on_one_postgres_share_keys_sessions_lockout_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(Backend::Postgres, dir.path()).await;
    // Migrations race safely: both instances start at once on the empty schema.
    let extra = [("GATEHOUSE_LOCKOUT_TIERS", "5:60,10:300,20:3600")];
    let (da, db_dir) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = tokio::join!(start(&db, &da, &extra), start(&db, &db_dir, &extra));
    let c = reqwest::Client::new();
    let jwks = |i: &Instance| c.get(format!("{}/.well-known/jwks.json", i.base)).send();
    let (ja, jb) = (jwks(&a).await.unwrap().text().await.unwrap(), jwks(&b).await.unwrap().text().await.unwrap());
    assert_eq!(ja, jb, "both instances publish the same key");

    for e in ["ann@example.com", "guess@example.com", "dev@example.com"] {
        create_user(&db, &dir.path().join("cli"), e, false, &[]);
    }

    // A token signed by one verifies on the other; an ended session stops on both at once.
    let t: Value = login(&c, &a.base, "ann@example.com", PASSWORD).await.json().await.unwrap();
    let at = t["access_token"].as_str().unwrap();
    assert_eq!(me(&c, &b.base, at).await, StatusCode::OK);
    let r = c.post(format!("{}/v1/auth/logout", a.base)).bearer_auth(at).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(me(&c, &b.base, at).await, StatusCode::UNAUTHORIZED);

    // Fifty simultaneous wrong guesses spread over both check five passwords.
    let guesses = (0..50).map(|i| {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        login(&c, base, "guess@example.com", "wrong password")
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(guesses).await.iter().map(|r| r.status()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 5, "{statuses:?}");
    // The rest were refused unchecked: locked (429), or overloaded (503) when more
    // arrived at once than an instance's hashing queue admits.
    assert!(statuses.iter().all(|s| [
        StatusCode::UNAUTHORIZED,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE
    ]
    .contains(s)));
    // The lock is visible from both.
    assert_eq!(login(&c, &a.base, "guess@example.com", PASSWORD).await.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(login(&c, &b.base, "guess@example.com", PASSWORD).await.status(), StatusCode::TOO_MANY_REQUESTS);

    // Parallel logins over both respect the device limit (2); four at once stay under
    // the first lockout tier, so none is refused while in flight.
    let logins = (0..4).map(|i| login(&c, if i % 2 == 0 { &a.base } else { &b.base }, "dev@example.com", PASSWORD));
    let mut tokens = Vec::new();
    for r in futures::future::join_all(logins).await {
        assert_eq!(r.status(), StatusCode::OK);
        tokens.push(r.json::<Value>().await.unwrap());
    }
    let mut live = 0;
    for t in &tokens {
        if me(&c, &a.base, t["access_token"].as_str().unwrap()).await == StatusCode::OK {
            live += 1;
        }
    }
    assert_eq!(live, 2);

    // Parallel refreshes of one live session's token over both yield one successor.
    let mut survivor = None;
    for t in &tokens {
        if me(&c, &b.base, t["access_token"].as_str().unwrap()).await == StatusCode::OK {
            survivor = Some(t);
        }
    }
    let survivor = survivor.unwrap();
    let old = survivor["refresh_token"].as_str().unwrap().to_owned();
    let refreshes = (0..10).map(|i| {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        post(&c, format!("{base}/v1/auth/refresh"), json!({"refresh_token": old}))
    });
    let mut successors = Vec::new();
    for r in futures::future::join_all(refreshes).await {
        assert_eq!(r.status(), StatusCode::OK);
        successors.push(r.json::<Value>().await.unwrap()["refresh_token"].as_str().unwrap().to_owned());
    }
    successors.dedup();
    assert_eq!(successors.len(), 1, "one successor across instances");
}

/// Sends `signal` to the instance's process.
fn signal(instance: &Instance, signal: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_child(&instance.child), signal).unwrap();
}

/// SIGTERM stops gracefully: the process waits for a request under way (a password
/// check of a second or more). A second signal stops it at once: the request is cut
/// off, not answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(Backend::Sqlite, dir.path()).await;
    let slow = [("GATEHOUSE_PASSWORD_HASH", "argon2id:m=65536,t=40,p=1")];
    let mut a = start(&db, &dir.path().join("data"), &slow).await;
    let url = format!("{}/v1/auth/login", a.base);
    let body = json!({"email": "nobody@example.com", "password": "a password"});
    let login = tokio::spawn(async move { reqwest::Client::new().post(url).json(&body).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&a, rustix::process::Signal::TERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.child.try_wait().unwrap().is_none(), "the first signal did not wait for the request under way");
    signal(&a, rustix::process::Signal::INT);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the second signal did not stop the process");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(130));
    let answer = login.await.unwrap();
    assert!(answer.is_err(), "the login was answered: the second signal waited for it ({answer:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_that_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(Backend::Sqlite, dir.path()).await;
    let data = dir.path().join("data");
    let c = reqwest::Client::new();
    let mut sessions = Vec::new();
    {
        let a = start(&db, &data, &[("GATEHOUSE_DEVICE_LIMIT", "0")]).await;
        create_user(&db, &data, "durable@example.com", false, &[]);
        for _ in 0..20 {
            let r = login(&c, &a.base, "durable@example.com", PASSWORD).await;
            assert_eq!(r.status(), StatusCode::OK);
            sessions.push(r.json::<Value>().await.unwrap());
        }
        // Rotations, at once so that they commit in groups: their successors are what
        // the clients now hold.
        let rotations = sessions.iter().map(|s| {
            let body = json!({"refresh_token": s["refresh_token"]});
            post(&c, format!("{}/v1/auth/refresh", a.base), body)
        });
        let rotated = futures::future::join_all(rotations).await;
        for (s, r) in sessions.iter_mut().zip(rotated) {
            assert_eq!(r.status(), StatusCode::OK);
            *s = r.json::<Value>().await.unwrap();
        }
        for _ in 0..5 {
            login(&c, &a.base, "durable@example.com", "wrong password").await;
        }
        let mut a = a;
        // SIGKILL right after the last acknowledged write.
        a.child.kill().unwrap();
        a.child.wait().unwrap();
    }
    let b = start(&db, &data, &[]).await;
    for s in &sessions {
        assert_eq!(me(&c, &b.base, s["access_token"].as_str().unwrap()).await, StatusCode::OK, "session survived");
        let r = post(&c, format!("{}/v1/auth/refresh", b.base), json!({"refresh_token": s["refresh_token"]})).await;
        assert_eq!(r.status(), StatusCode::OK, "the acknowledged rotation survived");
    }
    // The five acknowledged failures survived too: the account is locked.
    let r = login(&c, &b.base, "durable@example.com", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(Backend::Sqlite, dir.path()).await;
    let out = command(&db, dir.path(), &[("GATEHOUSE_DEVICE_LIMIT", "lots")]).arg("serve").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GATEHOUSE_DEVICE_LIMIT"), "{err}");
    let toml = dir.path().join("gatehouse.toml");
    std::fs::write(&toml, "lockout_tiers = \"oops\"\n").unwrap();
    let out = command(&db, dir.path(), &[]).args(["--config", toml.to_str().unwrap(), "migrate"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lockout_tiers"));
    // The environment wins over the file.
    let out = command(&db, dir.path(), &[("GATEHOUSE_LOCKOUT_TIERS", "3:30")])
        .args(["--config", toml.to_str().unwrap(), "migrate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A key that names no setting (a typo) stops it, named; so does a missing file.
    std::fs::write(&toml, "device_limt = 3\nlockout_tiers = \"3:30\"\n").unwrap();
    let out = command(&db, dir.path(), &[]).args(["--config", toml.to_str().unwrap(), "migrate"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device_limt") && err.contains("gatehouse.toml"), "{err}");
    let missing = dir.path().join("missing.toml");
    let out = command(&db, dir.path(), &[]).args(["--config", missing.to_str().unwrap(), "migrate"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_are_encrypted_at_rest_with_a_key_encryption_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(Backend::Sqlite, dir.path()).await;
    let data = dir.path().join("data");
    let kek = ("GATEHOUSE_KEY_ENCRYPTION_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    let c = reqwest::Client::new();
    let token = {
        let a = start(&db, &data, &[kek]).await;
        create_user(&db, &data, "kek@example.com", false, &[kek]);
        let t: Value = login(&c, &a.base, "kek@example.com", PASSWORD).await.json().await.unwrap();
        t["access_token"].as_str().unwrap().to_owned()
    };
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT private_key FROM signing_keys").fetch_one(&pool).await.unwrap();
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(stored).unwrap();
    assert!(raw.starts_with(b"GHKEK1"), "the private key is stored encrypted");
    pool.close().await;
    // Without the key the service refuses to start, naming the setting.
    let port = free_port().to_string();
    let out = command(&db, &data, &[("GATEHOUSE_LISTEN", &format!("127.0.0.1:{port}"))]).arg("serve").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GATEHOUSE_KEY_ENCRYPTION_KEY"));
    // With it, tokens signed before the restart still verify.
    let b = start(&db, &data, &[kek]).await;
    assert_eq!(me(&c, &b.base, &token).await, StatusCode::OK);
}

/// The crash comes while the first instance is sending the mail (its claim held): a
/// mail server that accepts the connection and never greets holds the send until the
/// kill. The restarted instance sends the mail once the dead one's claim lapses (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_acknowledged_before_a_crash_is_sent_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(Backend::Sqlite, dir.path()).await;
    let data = dir.path().join("data");
    let c = reqwest::Client::new();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let smtp = format!("smtp://{}", silent.local_addr().unwrap());
    {
        let a = start(&db, &data, &[("GATEHOUSE_MAIL_TRANSPORT", "smtp"), ("GATEHOUSE_SMTP_URL", &smtp)]).await;
        let r = post(
            &c,
            format!("{}/v1/auth/register", a.base),
            json!({"email": "queued@example.com", "password": PASSWORD}),
        )
        .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        // The first instance has claimed the mail and is sending it.
        let accepted =
            tokio::time::timeout(Duration::from_secs(20), tokio::task::spawn_blocking(move || silent.accept()));
        let (_held, _) = accepted.await.expect("the instance never connected to the mail server").unwrap().unwrap();
        let mut a = a;
        a.child.kill().unwrap();
        a.child.wait().unwrap();
    }
    let crashed = Instant::now();
    let _b = start(&db, &data, &[]).await;
    let outbox = data.join("outbox");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mails: Vec<String> = std::fs::read_dir(&outbox)
            .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect())
            .unwrap_or_default();
        if mails.iter().any(|m| m.contains("To: queued@example.com") && m.contains("token=")) {
            assert_eq!(mails.len(), 1, "sent once");
            break;
        }
        assert!(Instant::now() < deadline, "the queued verification mail was not sent after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not before the claim of the instance that died holding it lapsed (30 s after it
    // was taken, which was before the crash): nobody sent it twice meanwhile.
    assert!(crashed.elapsed() > Duration::from_secs(20), "sent {:?} after the crash", crashed.elapsed());
}

/// A SQLite URL of a file that does not exist yet (nor its directory), as a new
/// deployment names it: `migrate` and `serve` create it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_sqlite_url_creates_its_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db = format!("sqlite://{}", dir.path().join("new/gatehouse.db").display());
    let out = command(&db, &data, &[]).arg("migrate").output().unwrap();
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let db = format!("sqlite://{}", dir.path().join("other/gatehouse.db").display());
    let a = start(&db, &data, &[]).await;
    let c = reqwest::Client::new();
    let r = post(&c, format!("{}/v1/auth/register", a.base), json!({"email": "new@example.com", "password": PASSWORD}))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(dir.path().join("other/gatehouse.db").exists());
}
