//! PostgreSQL: each instance's memory of sessions and their users, for the Bearer check.
//!
//! Every authenticated request reads its session and user. On PostgreSQL that read is a
//! query through a pool, which held `GET /v1/me` to a quarter of the throughput it has on
//! SQLite (see the README's Performance section). Here each instance remembers what it
//! read and answers from memory with no round trip at all, without ever answering a
//! session that a write through Gatehouse ended before the request arrived, on this
//! instance or any other:
//!
//! - Triggers on `users` and `sessions` (migration 0003) send the user's id on the
//!   channel `gatehouse_cache` with every change, whoever makes it (any instance, an
//!   operator's SQL). PostgreSQL queues notifications in commit order and each listening
//!   connection receives them in that order. A change of a user's last login alone (a
//!   login without a place) sends the new last login instead (migration 0008), and a
//!   change of a session's last use alone sends the new last use (migration 0009): the
//!   sessions remembered are kept, with it.
//! - Leases (migration 0006): an instance answers from memory only within a lease that
//!   its listening connection renews every second in `gatehouse_instances`. A renewal
//!   counts only when a notification sent in the same transaction (a *fence*) comes
//!   back: by then every change committed before the renewal has been handled. The
//!   instance counts its lease on its own clock from before it sent the renewal, less
//!   [`LEASE_MARGIN`].
//! - Acknowledged writes ([`SessionCache::settle`]): a write that ends a session or
//!   changes a user, once committed, sends an acknowledgement request on the same
//!   channel (so it is queued after the change) and reads the live leases in the same
//!   statement. Each instance answers the request when it handles it, so after the
//!   change; the writer answers its client only when every instance read has answered
//!   or a whole [`LEASE`] has passed on the writer's clock (which outlasts any lease
//!   that instance holds). An instance that regains a lease did so by a fence queued
//!   after any such write it was not waited for.
//! - A read that began before a notification was handled does not keep its (possibly
//!   older) result: every notification moves an epoch, and a result is kept only if the
//!   epoch is the one seen before the read.
//! - Without a listening connection (at start, after a lost connection) or a lease, the
//!   memory is unused: every read goes to the database.
//!
//! Changes made outside Gatehouse (an operator's SQL) are not acknowledged: an instance
//! sees them when their notification arrives (how soon was not measured).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use uuid::Uuid;

use super::Session;
use crate::domain::user::User;

/// The notification channel the triggers of migration 0003 use; also carries the
/// acknowledgement requests of [`SessionCache::settle`].
pub const CHANNEL: &str = "gatehouse_cache";

/// The payload of migration 0003's TRUNCATE triggers: forget everything.
const FORGET_ALL: &str = "all";

/// An acknowledgement request's payload: `ack:<instance>:<number>`.
const ACK_REQUEST: &str = "ack:";

/// The payload of migration 0008's trigger for a change of a user's last login alone,
/// without a place: `login:<user>:<last_login_at>`.
const LOGIN_NOTE: &str = "login:";

/// The payload of migration 0009's trigger for a change of a session's last use alone:
/// `used:<user>:<session>:<last_used_at>`.
const USE_NOTE: &str = "used:";

/// How long a lease lasts. The instance counts it on its own clock from before it sent
/// the renewal (less [`LEASE_MARGIN`]); a write waits this long, on its own clock, for
/// an instance that does not acknowledge (a killed process, a lost network). No two
/// clocks need to agree, only to run at about the same rate.
pub const LEASE: Duration = Duration::from_secs(3);

/// How often the listening connection renews the lease.
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// How much sooner than a waiting write an instance counts its lease as over, for clocks
/// that run at slightly different rates.
const LEASE_MARGIN: Duration = Duration::from_millis(500);

/// How long one statement on the listening connection may take before it is presumed dead.
const STATEMENT_LIMIT: Duration = Duration::from_secs(5);

/// How long after its lease ran out, by PostgreSQL's clock, an instance is still waited
/// for. PostgreSQL's clock only decides which rows are recent enough to matter: a step
/// forward of up to this much does not drop a live lease.
const CLOCK_STEP_TOLERANCE: &str = "10 seconds";

/// Old leases' rows are deleted this long after they ran out.
const FORGET_LEASES_AFTER: &str = "1 hour";

/// Sessions and their users, forgotten by user.
pub struct SessionCache {
    state: Mutex<State>,
    capacity: usize,
    /// This instance's name in `gatehouse_instances` and in acknowledgements.
    id: Uuid,
    /// This instance's own channel for its renewals' fences (other instances never see
    /// them; PostgreSQL has one queue, so they stay in commit order with the triggers'
    /// notifications on the same connection).
    fence_channel: String,
    /// This instance's own channel for the acknowledgements of its writes.
    ack_channel: String,
    /// Whether the memory may be used at all: listening and, with a capacity, leased.
    ready: watch::Sender<bool>,
    /// The number of the last acknowledgement request.
    acks_asked: AtomicU64,
    /// Writes waiting for acknowledgements: the instances' ids go to the request's number.
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<Uuid>>>,
    /// Stopping: the lease was given up and is not taken again.
    retired: AtomicBool,
    /// Held by the listener while it renews, so that giving the lease up waits for a
    /// renewal under way rather than be undone by it.
    renewing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Whether the listener is listening; entries are kept only then.
    listening: bool,
    /// Until when entries may be used: this instance's lease as it counts it.
    lease: Option<Instant>,
    /// Moves with every notification and every reset.
    epoch: u64,
    sessions: HashMap<Uuid, (Session, User)>,
    by_user: HashMap<Uuid, Vec<Uuid>>,
    reads: MemoryReads,
}

/// How this instance's reads of sessions were answered since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReads {
    /// From memory.
    pub hits: u64,
    /// From the database, the session not being remembered.
    pub misses: u64,
    /// From the database, the memory not being usable: not listening, or no lease.
    pub unleased: u64,
}

impl State {
    fn forget_user(&mut self, uid: Uuid) {
        self.epoch += 1;
        if let Some(sids) = self.by_user.remove(&uid) {
            for sid in sids {
                self.sessions.remove(&sid);
            }
        }
    }

    /// A login of the user without a place: the sessions remembered stay, with the
    /// user's new last login.
    fn note_login(&mut self, uid: Uuid, at: i64) {
        self.epoch += 1;
        for sid in self.by_user.get(&uid).into_iter().flatten() {
            if let Some((_, user)) = self.sessions.get_mut(sid) {
                user.last_login_at = Some(at);
                user.last_login_geolocation = None;
            }
        }
    }

    /// A use of the user's session `sid` at `at`: the session remembered stays, with its
    /// new last use.
    fn note_use(&mut self, uid: Uuid, sid: Uuid, at: i64) {
        self.epoch += 1;
        if let Some((session, _)) = self.sessions.get_mut(&sid) {
            if session.user_id == uid {
                session.last_used_at = at;
            }
        }
    }

    fn forget_all(&mut self) {
        self.epoch += 1;
        self.sessions.clear();
        self.by_user.clear();
    }
}

/// Removes a write's wait when it ends, however it ends.
struct Waiting<'a>(&'a SessionCache, u64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting().remove(&self.1);
    }
}

impl SessionCache {
    /// A memory of at most `capacity` sessions, unused until [`listen`] holds a lease.
    /// With no capacity it remembers nothing and holds no lease, but still listens, for
    /// the acknowledgements its writes wait for.
    pub fn new(capacity: usize) -> Arc<Self> {
        let id = Uuid::new_v4();
        Arc::new(Self {
            state: Mutex::new(State::default()),
            capacity,
            id,
            fence_channel: format!("gatehouse_fence_{}", id.simple()),
            ack_channel: ack_channel(id),
            ready: watch::Sender::new(false),
            acks_asked: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            retired: AtomicBool::new(false),
            renewing: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code below panics while holding the lock; recover the data if one ever did.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<Uuid>>> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The remembered session and user, if any, when this instance holds its lease.
    pub fn get(&self, sid: Uuid) -> Option<(Session, User)> {
        let mut state = self.state();
        let leased = state.lease.is_some_and(|until| Instant::now() < until);
        if !(state.listening && leased) {
            state.reads.unleased += 1;
            return None;
        }
        let hit = state.sessions.get(&sid).cloned();
        match hit {
            Some(_) => state.reads.hits += 1,
            None => state.reads.misses += 1,
        }
        hit
    }

    /// How reads were answered so far; `None` without a capacity (nothing is ever
    /// remembered).
    pub fn reads(&self) -> Option<MemoryReads> {
        (self.capacity > 0).then(|| self.state().reads)
    }

    /// The epoch to pass to [`put`] before reading the database; `None` when not listening.
    pub fn epoch(&self) -> Option<u64> {
        let state = self.state();
        state.listening.then_some(state.epoch)
    }

    /// Remembers a session read after [`epoch`] returned `epoch`, unless a change was
    /// handled since (then the read may predate the change).
    pub fn put(&self, epoch: u64, session: Session, user: User) {
        let mut state = self.state();
        if !state.listening || state.epoch != epoch || self.capacity == 0 {
            return;
        }
        if state.sessions.len() >= self.capacity && !state.sessions.contains_key(&session.id) {
            // Full: start again rather than track recency on every hit.
            state.sessions.clear();
            state.by_user.clear();
        }
        let (sid, uid) = (session.id, user.id);
        if state.sessions.insert(sid, (session, user)).is_none() {
            state.by_user.entry(uid).or_default().push(sid);
        }
    }

    /// Handles one notification on the shared channel or on this instance's
    /// acknowledgement channel; returns an acknowledgement to send, as a channel and a
    /// payload, when another instance asked for one.
    fn notified(&self, channel: &str, payload: &str) -> Option<(String, String)> {
        if channel == self.ack_channel {
            let (from, n) = payload.split_once(':')?;
            self.acknowledged(Uuid::parse_str(from).ok()?, n.parse().ok()?);
            return None;
        }
        if channel != CHANNEL {
            return None;
        }
        if let Some(request) = payload.strip_prefix(ACK_REQUEST) {
            // Everything queued before the request has been handled: acknowledge it.
            let (from, n) = request.split_once(':')?;
            let (from, n) = (Uuid::parse_str(from).ok()?, n.parse::<u64>().ok()?);
            if from == self.id {
                self.acknowledged(self.id, n);
            } else if self.capacity > 0 {
                // Without a capacity this instance holds no lease: nobody waits for it.
                return Some((ack_channel(from), format!("{}:{n}", self.id)));
            }
        } else if let Some(note) = payload.strip_prefix(LOGIN_NOTE) {
            self.note(note, |state, uid, at| {
                state.note_login(uid, at.parse().ok()?);
                Some(())
            });
        } else if let Some(note) = payload.strip_prefix(USE_NOTE) {
            self.note(note, |state, uid, rest| {
                let (sid, at) = rest.split_once(':')?;
                state.note_use(uid, Uuid::parse_str(sid).ok()?, at.parse().ok()?);
                Some(())
            });
        } else if payload == FORGET_ALL {
            self.state().forget_all();
        } else if let Ok(uid) = Uuid::parse_str(payload) {
            self.state().forget_user(uid);
        }
        None
    }

    /// A note `<user>:<rest>` about one user's sessions: `apply` it to the memory, or,
    /// when it is not understood (`apply` gives `None`, or no user id), forget what it
    /// may concern: that user, or everything.
    fn note(&self, note: &str, apply: impl FnOnce(&mut State, Uuid, &str) -> Option<()>) {
        let (uid, rest) = note.split_once(':').unwrap_or((note, ""));
        let mut state = self.state();
        match Uuid::parse_str(uid) {
            Ok(uid) => {
                if apply(&mut state, uid, rest).is_none() {
                    state.forget_user(uid);
                }
            }
            Err(_) => state.forget_all(),
        }
    }

    /// Instance `from` handled this instance's acknowledgement request `n`.
    fn acknowledged(&self, from: Uuid, n: u64) {
        if let Some(waiting) = self.waiting().get(&n) {
            let _ = waiting.send(from);
        }
    }

    /// The renewal sent at `sent` came back: the lease holds until `sent` plus the
    /// lease, less the margin.
    fn renewed(&self, sent: Instant) {
        let mut state = self.state();
        if state.listening && !self.retired.load(Ordering::SeqCst) {
            state.lease = Some(sent + LEASE - LEASE_MARGIN);
            self.ready.send_replace(true);
        }
    }

    /// Forgets everything and gives up the lease; uses the memory again only if
    /// `listening`, once a lease is held.
    fn reset(&self, listening: bool) {
        let mut state = self.state();
        state.forget_all();
        state.listening = listening;
        state.lease = None;
        self.ready.send_replace(listening && self.capacity == 0);
    }

    /// Waits up to `limit` for the listener to listen (and, with a capacity, to hold a
    /// lease); whether it does.
    pub async fn wait_listening(&self, limit: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|ready| *ready)).await.is_ok_and(|r| r.is_ok())
    }

    /// Returns when every instance that may answer from memory has handled every change
    /// committed before this call, or can no longer answer from memory: call it after
    /// committing a write that ends a session or changes a user, before answering.
    pub async fn settle(&self, pool: &AnyPool) {
        let n = self.acks_asked.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, acks) = mpsc::unbounded_channel();
        self.waiting().insert(n, tx);
        let _waiting = Waiting(self, n);
        // The request is queued after the change (it commits after it); the leases are
        // read after the change committed, so an instance that is not among them can
        // only gain a lease by a fence queued after the change. One that is among them
        // counts its lease from before its renewal, which committed before this read:
        // a lease from now on this clock outlasts it.
        let asked = sqlx::query(&SETTLE_SQL)
            .bind(CHANNEL)
            .bind(format!("{ACK_REQUEST}{}:{n}", self.id))
            .fetch_all(pool)
            .await
            .and_then(|rows| {
                let until = Instant::now() + LEASE;
                let mut leases = HashMap::new();
                for row in rows {
                    let Some(id) = row.try_get::<Option<String>, _>("id")? else { continue };
                    let id = Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                    leases.insert(id, until);
                }
                Ok(leases)
            });
        match asked {
            Ok(leases) => wait_for_acks(leases, acks).await,
            Err(e) => {
                // Any lease that can miss the change was granted before it committed, so
                // ends within a lease from now.
                tracing::warn!(error = %e, "cannot ask the instances to acknowledge a change; waiting out their leases");
                tokio::time::sleep(LEASE).await;
            }
        }
    }

    /// Gives up the lease for good, so that no write waits for this instance once it
    /// stops: the memory is no longer used, then, once a renewal under way has ended, the
    /// lease's row is deleted.
    pub async fn retire(&self, pool: &AnyPool) {
        self.retired.store(true, Ordering::SeqCst);
        self.state().lease = None;
        let _no_renewal = self.renewing.lock().await;
        let gone =
            sqlx::query("DELETE FROM gatehouse_instances WHERE id = $1").bind(self.id.to_string()).execute(pool).await;
        if let Err(e) = gone {
            tracing::warn!(error = %e, "could not give up this instance's lease; it runs out within seconds");
        }
    }

    /// Listens on `url` for as long as the task runs, reconnecting after a loss.
    pub async fn listen(self: Arc<Self>, url: String) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.listen_once(&url).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "session memory: cannot listen; reading sessions from the database");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            self.reset(false);
            tokio::time::sleep(backoff).await;
        }
    }

    /// One connection's life: returns when it is lost (or presumed lost).
    ///
    /// The same connection renews the lease, with a fence in the renewal's transaction,
    /// and sends the acknowledgements that other instances' writes ask for.
    async fn listen_once(&self, url: &str) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect(url).await?;
        listener.eager_reconnect(false);
        listener.listen_all([CHANNEL, self.fence_channel.as_str(), self.ack_channel.as_str()]).await?;
        // Listening from here on: what is read from now on will be reported if it changes.
        self.reset(true);
        if self.capacity > 0 {
            let forget =
                format!("DELETE FROM gatehouse_instances WHERE lease_until < now() - interval '{FORGET_LEASES_AFTER}'");
            within_limit(sqlx::query(&forget).execute(&mut listener)).await?;
        }
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Renewals sent whose fence has not come back: their numbers and when they were sent.
        let mut renewals: VecDeque<(u64, Instant)> = VecDeque::new();
        let (mut sent, mut last_renewed) = (0u64, Instant::now());
        loop {
            tokio::select! {
                n = listener.try_recv() => {
                    let Some(first) = n? else { break };
                    // This one and those already buffered behind it, in order; their
                    // acknowledgements go out together.
                    let mut acks = Vec::new();
                    let mut next = Some(first);
                    while let Some(n) = next {
                        if n.channel() == self.fence_channel {
                            if let Some(at) = n.payload().parse().ok().and_then(|k| fence_came_back(&mut renewals, k)) {
                                self.renewed(at);
                                last_renewed = Instant::now();
                            }
                        } else if let Some(ack) = self.notified(n.channel(), n.payload()) {
                            acks.push(ack);
                        }
                        next = listener.next_buffered();
                    }
                    if !acks.is_empty() {
                        let (channels, payloads): (Vec<String>, Vec<String>) = acks.into_iter().unzip();
                        let send = sqlx::query("SELECT pg_notify(c, p) FROM unnest($1::TEXT[], $2::TEXT[]) AS a(c, p)")
                            .bind(channels)
                            .bind(payloads);
                        within_limit(send.execute(&mut listener)).await?;
                    }
                }
                _ = renew.tick() => {
                    // Without a lease to renew, the tick still checks the connection: a
                    // connection that died silently would otherwise never be noticed.
                    let renewing = self.renewing.lock().await;
                    if self.capacity == 0 || self.retired.load(Ordering::SeqCst) {
                        within_limit(sqlx::query("SELECT 1").execute(&mut listener)).await?;
                        continue;
                    }
                    if last_renewed.elapsed() > 2 * LEASE {
                        tracing::warn!("session memory: renewals are not coming back; listening anew");
                        return Ok(());
                    }
                    sent += 1;
                    let at = Instant::now();
                    let renewal = sqlx::query(&RENEW_SQL)
                        .bind(self.id.to_string())
                        .bind(&self.fence_channel)
                        .bind(sent.to_string());
                    within_limit(renewal.execute(&mut listener)).await?;
                    drop(renewing);
                    renewals.push_back((sent, at));
                }
            }
        }
        tracing::warn!("session memory: connection lost; reading sessions from the database until it is back");
        Ok(())
    }
}

/// The renewal whose fence `k` came back, if it is one still awaited: when it was sent.
/// Earlier renewals still awaited will never come back on this connection.
fn fence_came_back(renewals: &mut VecDeque<(u64, Instant)>, k: u64) -> Option<Instant> {
    let mut at = None;
    while renewals.front().is_some_and(|(r, _)| *r <= k) {
        at = renewals.pop_front().filter(|(r, _)| *r == k).map(|(_, t)| t);
    }
    at
}

/// The channel of instance `id`'s acknowledgements.
fn ack_channel(id: Uuid) -> String {
    format!("gatehouse_ack_{}", id.simple())
}

/// Renews (or takes) the lease of `$1` and sends the fence `$3` on `$2` in the same
/// transaction. Durable at commit (the connection keeps `synchronous_commit` on): a
/// lease this instance counts on is never lost by a crash of PostgreSQL.
static RENEW_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH lease AS (INSERT INTO gatehouse_instances (id, lease_until) \
           VALUES ($1, now() + interval '{} milliseconds') \
           ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until RETURNING id) \
         SELECT pg_notify($2, $3) FROM lease",
        LEASE.as_millis()
    )
});

/// Sends the acknowledgement request `$2` on `$1` and reads the instances whose lease
/// may still hold (one row with a NULL when there are none).
static SETTLE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT i.id FROM (SELECT pg_notify($1, $2) AS sent) request \
         LEFT JOIN gatehouse_instances i ON i.lease_until > now() - interval '{CLOCK_STEP_TOLERANCE}'"
    )
});

/// Waits until every instance in `leases` has acknowledged (its id arrives on `acks`)
/// or the time given for it has passed.
async fn wait_for_acks(mut leases: HashMap<Uuid, Instant>, mut acks: mpsc::UnboundedReceiver<Uuid>) {
    loop {
        let now = Instant::now();
        leases.retain(|_, until| *until > now);
        let Some(next) = leases.values().min().copied() else { return };
        match tokio::time::timeout_at(next, acks.recv()).await {
            Ok(Some(from)) => {
                leases.remove(&from);
            }
            Ok(None) => return,
            Err(_) => {}
        }
    }
}

/// Runs one statement of the listening connection, presuming the connection dead if it
/// takes longer than [`STATEMENT_LIMIT`].
async fn within_limit<T>(
    statement: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(STATEMENT_LIMIT, statement)
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::user::{Role, Status};

    fn entry(uid: Uuid) -> (Session, User) {
        let session = Session {
            id: Uuid::new_v4(),
            user_id: uid,
            created_at: 0,
            last_used_at: 0,
            expires_at: 100,
            ip: None,
            user_agent: None,
            ended_at: None,
        };
        let user = User {
            id: uid,
            email: "a@example.com".into(),
            name: None,
            password_hash: None,
            role: Role::User,
            status: Status::Active,
            email_verified_at: None,
            created_at: 0,
            updated_at: 0,
            last_login_at: None,
            last_login_geolocation: None,
            metadata: serde_json::json!({}),
        };
        (session, user)
    }

    /// A memory that listens and holds a lease from now, with one entry; its session id.
    fn leased_with_one_entry(uid: Uuid) -> (Arc<SessionCache>, Uuid) {
        let cache = SessionCache::new(10);
        cache.reset(true);
        let (s, u) = entry(uid);
        let sid = s.id;
        cache.put(cache.epoch().expect("listening"), s, u);
        cache.renewed(Instant::now());
        (cache, sid)
    }

    #[test]
    fn unused_until_listening() {
        let cache = SessionCache::new(10);
        assert_eq!(cache.epoch(), None);
        let (s, u) = entry(Uuid::new_v4());
        let sid = s.id;
        cache.put(0, s, u);
        cache.renewed(Instant::now());
        assert!(cache.get(sid).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_is_answered_only_within_the_lease() {
        let cache = SessionCache::new(10);
        cache.reset(true);
        let (s, u) = entry(Uuid::new_v4());
        let sid = s.id;
        cache.put(cache.epoch().expect("listening"), s, u);
        assert!(cache.get(sid).is_none(), "listening, but no lease yet");
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        cache.renewed(sent);
        assert_eq!(cache.get(sid).map(|(s, _)| s.id), Some(sid));
        // Counted from when the renewal was sent, less the margin.
        tokio::time::advance(LEASE - LEASE_MARGIN - Duration::from_millis(101)).await;
        assert!(cache.get(sid).is_some());
        assert!(cache.get(Uuid::new_v4()).is_none(), "not remembered");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(cache.get(sid).is_none(), "the lease ran out");
        assert_eq!(cache.reads(), Some(MemoryReads { hits: 2, misses: 1, unleased: 2 }), "each read counted once");
        assert_eq!(SessionCache::new(0).reads(), None, "without a capacity nothing is counted");
    }

    /// Remembers a session of another user in `cache`; its id.
    fn another_users_entry(cache: &SessionCache) -> Uuid {
        let (other, other_user) = entry(Uuid::new_v4());
        let sid = other.id;
        cache.put(cache.epoch().expect("listening"), other, other_user);
        sid
    }

    /// Whether a session of `uid` read after [`SessionCache::epoch`] gave `epoch` is kept.
    fn read_is_kept(cache: &SessionCache, epoch: u64, uid: Uuid) -> bool {
        let (s, u) = entry(uid);
        let sid = s.id;
        cache.put(epoch, s, u);
        cache.state().sessions.contains_key(&sid)
    }

    #[test]
    fn a_notification_forgets_the_users_sessions_and_refuses_reads_begun_before_it() {
        let uid = Uuid::new_v4();
        let (cache, sid1) = leased_with_one_entry(uid);
        let other_sid = another_users_entry(&cache);
        let epoch = cache.epoch().expect("listening");

        assert_eq!(cache.notified(CHANNEL, &uid.to_string()), None);
        assert!(cache.get(sid1).is_none(), "the user's session is forgotten");
        assert!(cache.get(other_sid).is_some(), "other users' sessions are kept");
        assert!(!read_is_kept(&cache, epoch, uid), "a read begun before the notification is not kept");
    }

    #[test]
    fn a_login_note_updates_the_users_remembered_sessions_and_refuses_reads_begun_before_it() {
        let uid = Uuid::new_v4();
        let (cache, sid) = leased_with_one_entry(uid);
        let other_sid = another_users_entry(&cache);
        let epoch = cache.epoch().expect("listening");

        // A place from an earlier login is cleared: the note is of a login without one.
        cache.state().sessions.get_mut(&sid).expect("remembered").1.last_login_geolocation =
            Some(serde_json::json!({"city": "Wellington"}));
        assert_eq!(cache.notified(CHANNEL, &format!("{LOGIN_NOTE}{uid}:1700000000")), None);
        let (_, user) = cache.get(sid).expect("the user's session is kept");
        assert_eq!((user.last_login_at, user.last_login_geolocation), (Some(1_700_000_000), None));
        assert_eq!(cache.get(other_sid).expect("kept").1.last_login_at, None, "other users are untouched");
        assert!(!read_is_kept(&cache, epoch, uid), "a read begun before the note is not kept");
    }

    #[test]
    fn a_use_note_updates_the_remembered_session_and_refuses_reads_begun_before_it() {
        let uid = Uuid::new_v4();
        let (cache, sid) = leased_with_one_entry(uid);
        let other_sid = another_users_entry(&cache);
        let epoch = cache.epoch().expect("listening");
        assert_eq!(cache.notified(CHANNEL, &format!("{USE_NOTE}{uid}:{sid}:1700000060")), None);
        assert_eq!(cache.get(sid).expect("the session is kept").0.last_used_at, 1_700_000_060);
        assert_eq!(cache.get(other_sid).expect("kept").0.last_used_at, 0, "other sessions are untouched");
        assert!(!read_is_kept(&cache, epoch, uid), "a read begun before the note is not kept");
        // A note naming the session under another user changes nothing.
        cache.notified(CHANNEL, &format!("{USE_NOTE}{}:{sid}:1700000999", Uuid::new_v4()));
        assert_eq!(cache.get(sid).expect("kept").0.last_used_at, 1_700_000_060);
    }

    #[test]
    fn a_use_note_not_understood_forgets_what_it_may_concern() {
        let uid = Uuid::new_v4();
        for bad in [format!("{uid}:nonsense:1"), format!("{uid}:{}:soon", Uuid::new_v4()), format!("{uid}")] {
            let (cache, sid) = leased_with_one_entry(uid);
            let other_sid = another_users_entry(&cache);
            cache.notified(CHANNEL, &format!("{USE_NOTE}{bad}"));
            assert!(cache.get(sid).is_none(), "{bad}: the user is forgotten");
            assert!(cache.get(other_sid).is_some(), "{bad}: other users are kept");
        }
        let (cache, sid) = leased_with_one_entry(uid);
        let other_sid = another_users_entry(&cache);
        cache.notified(CHANNEL, &format!("{USE_NOTE}someone:{sid}:1"));
        assert!(cache.get(sid).is_none() && cache.get(other_sid).is_none(), "a bad user id forgets everything");
    }

    #[test]
    fn a_login_note_not_understood_forgets_what_it_may_concern() {
        let uid = Uuid::new_v4();
        let (cache, sid) = leased_with_one_entry(uid);
        cache.notified(CHANNEL, &format!("{LOGIN_NOTE}{uid}:soon"));
        assert!(cache.get(sid).is_none(), "a bad time forgets the user");
        let (cache, sid) = leased_with_one_entry(uid);
        cache.notified(CHANNEL, &format!("{LOGIN_NOTE}{uid}:1:{{\"city\":\"Wellington\"}}"));
        assert!(cache.get(sid).is_none(), "a note with more than it should forgets the user");
        let (cache, sid) = leased_with_one_entry(uid);
        cache.notified(CHANNEL, &format!("{LOGIN_NOTE}{uid}"));
        assert!(cache.get(sid).is_none(), "a note without a time forgets the user");
        let (cache, sid) = leased_with_one_entry(uid);
        let other_sid = another_users_entry(&cache);
        cache.notified(CHANNEL, &format!("{LOGIN_NOTE}someone:1"));
        assert!(cache.get(sid).is_none() && cache.get(other_sid).is_none(), "a bad id forgets everything");
    }

    #[test]
    fn losing_the_listener_forgets_everything_and_the_lease() {
        let (cache, sid) = leased_with_one_entry(Uuid::new_v4());
        cache.reset(false);
        assert!(cache.get(sid).is_none());
        cache.renewed(Instant::now());
        assert!(cache.state().lease.is_none(), "a renewal that comes back after the loss counts for nothing");
    }

    #[test]
    fn a_truncation_forgets_everything() {
        let (cache, sid) = leased_with_one_entry(Uuid::new_v4());
        cache.notified(CHANNEL, FORGET_ALL);
        assert!(cache.get(sid).is_none());
    }

    #[test]
    fn another_instances_request_is_acknowledged_on_its_channel_and_ones_own_at_once() {
        let (cache, _) = leased_with_one_entry(Uuid::new_v4());
        let other = Uuid::new_v4();
        let reply = cache.notified(CHANNEL, &format!("ack:{other}:7"));
        assert_eq!(reply, Some((ack_channel(other), format!("{}:7", cache.id))));

        let (tx, mut rx) = mpsc::unbounded_channel();
        cache.waiting().insert(3, tx);
        assert_eq!(cache.notified(CHANNEL, &format!("ack:{}:3", cache.id)), None);
        assert_eq!(rx.try_recv().ok(), Some(cache.id));
        // An acknowledgement from another instance on this instance's channel.
        assert_eq!(cache.notified(&cache.ack_channel, &format!("{other}:3")), None);
        assert_eq!(rx.try_recv().ok(), Some(other));
        // Garbage is ignored.
        assert_eq!(cache.notified(CHANNEL, "ack:nonsense"), None);
        assert_eq!(cache.notified(&cache.ack_channel, "x:y"), None);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn without_a_capacity_nothing_is_remembered_nor_acknowledged() {
        let cache = SessionCache::new(0);
        cache.reset(true);
        assert!(*cache.ready.borrow(), "ready to hear acknowledgements once listening");
        let (s, u) = entry(Uuid::new_v4());
        cache.put(cache.epoch().expect("listening"), s, u);
        assert!(cache.state().sessions.is_empty());
        assert_eq!(cache.notified(CHANNEL, &format!("ack:{}:1", Uuid::new_v4())), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_waits_for_every_acknowledgement_or_lease_end() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let start = Instant::now();
        let leases = HashMap::from([(a, start + Duration::from_secs(2)), (b, start + Duration::from_secs(3))]);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(b).unwrap();
        wait_for_acks(leases.clone(), rx).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(2), "a's lease ran out; b answered");

        let (tx, rx) = mpsc::unbounded_channel();
        let answer = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(a).unwrap();
            tx.send(b).unwrap();
        };
        let start = Instant::now();
        let leases = HashMap::from([(a, start + Duration::from_secs(2)), (b, start + Duration::from_secs(3))]);
        tokio::join!(wait_for_acks(leases, rx), answer);
        assert_eq!(Instant::now() - start, Duration::from_millis(5), "both answered");
    }

    #[test]
    fn a_renewal_counts_from_when_it_was_sent_and_earlier_ones_are_dropped() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut renewals = VecDeque::from([(1, at(0)), (2, at(1000)), (3, at(2000))]);
        assert_eq!(fence_came_back(&mut renewals, 2), Some(at(1000)));
        assert_eq!(renewals, VecDeque::from([(3, at(2000))]), "renewal 1 will not come back now");
        assert_eq!(fence_came_back(&mut renewals, 1), None, "an old fence counts for nothing");
        assert_eq!(fence_came_back(&mut renewals, 7), None, "nor one never sent");
        assert!(renewals.is_empty());
    }

    #[test]
    fn a_retired_instance_takes_no_lease_again() {
        let (cache, sid) = leased_with_one_entry(Uuid::new_v4());
        cache.retired.store(true, Ordering::SeqCst);
        cache.state().lease = None;
        cache.renewed(Instant::now());
        assert!(cache.get(sid).is_none());
    }

    #[test]
    fn a_full_memory_starts_again() {
        let cache = SessionCache::new(2);
        cache.reset(true);
        let epoch = cache.epoch().expect("listening");
        let entries: Vec<_> = (0..3).map(|_| entry(Uuid::new_v4())).collect();
        let sids: Vec<Uuid> = entries.iter().map(|(s, _)| s.id).collect();
        for (s, u) in entries {
            cache.put(epoch, s, u);
        }
        let state = cache.state();
        assert!(!state.sessions.contains_key(&sids[0]));
        assert!(state.sessions.contains_key(&sids[2]));
    }
}
