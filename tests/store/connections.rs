//! PostgreSQL only: the connections of the hot statements (src/store/pg_direct.rs),
//! which skip sqlx's ping around every use, and the pool's ping only after idling.

use std::time::Duration;

use gatehouse::store::{Reservation, Rotation};

use crate::postgres_only;
use crate::support::*;

postgres_only!(
    connections_the_server_closed_while_idle_are_replaced_before_use,
    a_login_write_abandoned_mid_statement_keeps_its_connection_and_leaves_answers_right,
    an_error_raised_at_commit_after_the_row_is_the_login_s_own,
    a_login_planned_on_an_empty_table_reads_only_its_user_s_sessions,
);

/// A fresh PostgreSQL database whose connections carry a name of their own, so that a
/// test can end them without touching other tests' connections.
async fn named_db() -> (Db, String) {
    let mut db = Db::new(Backend::Postgres).await;
    let name = format!("gh_{}", uuid::Uuid::new_v4().simple());
    db.url = format!("{}&application_name={name}", db.url);
    db.store = open(&db.url).await;
    (db, name)
}

/// Ends every server process serving a connection named `name`; how many it ended.
async fn terminate(url: &str, name: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()) t",
    )
    .bind(name)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    ended
}

async fn connections_the_server_closed_while_idle_are_replaced_before_use() {
    let (db, name) = named_db().await;
    let u = user(&*db.store, "idle@example.test").await;
    let p = default_policy();
    // Every kind of connection in use once: the counters', the durable ones, the pool's.
    assert!(matches!(
        db.store.reserve_login_for("idle@example.test", &p, T0).await.unwrap().0,
        Reservation::Allowed { .. }
    ));
    let s = login(&*db.store, u.id, T0).await;
    let (r, _) = rotate(&s.refresh, T0 + 1);
    assert!(matches!(db.store.rotate_refresh(&r).await.unwrap(), Rotation::Rotated { .. }));

    // A restarted server (or a failover) ends every connection while it lies idle.
    assert!(terminate(&db.url, &name).await >= 3, "the store's connections carry the test's name");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Each kind is tested before use after idling, and replaced: no call fails.
    let (reserved, read) = db.store.reserve_login_for("idle@example.test", &p, T0 + 2).await.unwrap();
    assert_eq!(reserved, Reservation::Allowed { failures: 1 }, "the login's session cleared the first count");
    assert_eq!(read.map(|u| u.id), Some(u.id));
    let s2 = login(&*db.store, u.id, T0 + 2).await;
    let (r2, _) = rotate(&s2.refresh, T0 + 3);
    assert!(matches!(db.store.rotate_refresh(&r2).await.unwrap(), Rotation::Rotated { .. }));
    assert!(db.store.session_with_user(s.id).await.unwrap().is_some());

    // Ended while in recent use (not tested before use): a call may fail, as a
    // transient error (answered 503), and the connection is closed, not reused: the
    // next call succeeds.
    assert!(terminate(&db.url, &name).await >= 3);
    let first = db.store.reserve_login_for("idle@example.test", &p, T0 + 4).await;
    assert!(ok_or_transient(&first), "{first:?}");
    assert!(db.store.reserve_login_for("idle@example.test", &p, T0 + 4).await.is_ok());
    let (_, s3) = new_session(u.id, T0 + 4);
    let first = db.store.open_session(&s3, 0).await;
    assert!(ok_or_transient(&first), "{first:?}");
    let (_, s3) = new_session(u.id, T0 + 4);
    assert!(db.store.open_session(&s3, 0).await.unwrap().is_some());
}

/// Whether `r` succeeded or failed only transiently (answered 503).
fn ok_or_transient<T>(r: &gatehouse::store::StoreResult<T>) -> bool {
    r.as_ref().map_or_else(|e| e.is_transient(), |_| true)
}

async fn a_login_write_abandoned_mid_statement_keeps_its_connection_and_leaves_answers_right() {
    let (db, name) = named_db().await;
    let u = user(&*db.store, "abandoned@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    // An operator's transaction holds the user's row: the login's write waits for it.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
        .bind(u.id.to_string())
        .execute(&mut *holder)
        .await
        .unwrap();
    let (_, waiting) = new_session(u.id, T0);
    let abandoned = tokio::time::timeout(Duration::from_millis(300), db.store.open_session(&waiting, 0)).await;
    assert!(abandoned.is_err(), "the write waited for the row and was abandoned");
    // The server process still running the abandoned statement.
    let waiter: i32 =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'")
            .bind(&name)
            .fetch_one(&pool)
            .await
            .unwrap();
    holder.rollback().await.unwrap();

    // Every later call gets its own statement's answer, never the abandoned one's.
    for k in 0..8 {
        let who = if k % 2 == 0 { &u } else { &other };
        let (opened, s) = new_session(who.id, T0 + 1 + k);
        let (got, _) = db.store.open_session(&s, 0).await.unwrap().expect("session opened");
        assert_eq!(got.id, who.id);
        let (session, owner) = db.store.session_with_user(opened.id).await.unwrap().expect("session stored");
        assert_eq!((session.id, owner.id), (opened.id, who.id));
    }
    // The abandoned statement's connection waited for it to end and serves again
    // (closed, its server process would have ended when it wrote its answer).
    let alive: bool = sqlx::query_scalar("SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1")
        .bind(waiter)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(alive, "the abandoned statement's connection was closed instead of reused");
    pool.close().await;
}

async fn an_error_raised_at_commit_after_the_row_is_the_login_s_own() {
    let db = Db::new(Backend::Postgres).await;
    let u = user(&*db.store, "deferred@example.test").await;
    let other = user(&*db.store, "bystander@example.test").await;
    // An operator's deferred constraint: one login event per user, checked at commit,
    // after the session function has sent its row.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "ALTER TABLE events ADD CONSTRAINT one_login_each UNIQUE (user_id, kind) DEFERRABLE INITIALLY DEFERRED",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    login(&*db.store, u.id, T0).await;

    // The second login of the user fails at commit: it must hear so itself...
    let (refused, s) = new_session(u.id, T0 + 1);
    assert!(db.store.open_session(&s, 0).await.is_err(), "a login whose commit failed was answered as opened");
    assert!(db.store.session_with_user(refused.id).await.unwrap().is_none());
    // ...and the next login on that connection must not hear it instead.
    let (opened, s) = new_session(other.id, T0 + 2);
    let (got, _) = db.store.open_session(&s, 0).await.unwrap().expect("session opened");
    assert_eq!(got.id, other.id);
    assert!(db.store.session_with_user(opened.id).await.unwrap().is_some());
}

/// Calls the login's function (migrations/postgres) on `conn` for `user`, at `now`, with
/// a device limit of 1; the sessions rows it fetched or scanned in its transaction.
async fn sessions_rows_read_by_a_login(conn: &mut sqlx::PgConnection, user: uuid::Uuid, now: i64) -> i64 {
    use sqlx::Connection;
    let mut tx = conn.begin().await.unwrap();
    let opened: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM gatehouse_open_session($1, $2, $3, $3 + 3600, '192.0.2.7', 'plan-test', \
         $4, $3 + 3600, NULL, '', 1, '{}')",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(user.to_string())
    .bind(now)
    .bind(uuid::Uuid::new_v4().to_string())
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(opened, 1, "the login opened a session");
    let read: i64 = sqlx::query_scalar(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables \
         WHERE relid = 'sessions'::regclass",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    read
}

/// A connection keeps the plan it made of the login's statements; one made while
/// `sessions` was empty (a new database) must not read other users' sessions once the
/// table has grown (with autovacuum off nothing replans it). Seen failing before 0007:
/// the device limit's eviction read every live session of every user.
async fn a_login_planned_on_an_empty_table_reads_only_its_user_s_sessions() {
    use sqlx::Connection;
    let db = Db::new(Backend::Postgres).await;
    let (a, b) = (user(&*db.store, "planned@example.test").await, user(&*db.store, "many@example.test").await);
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // An ANALYZE by autovacuum would make the connection plan anew, and the test pass
    // whatever the function.
    sqlx::query("ALTER TABLE sessions SET (autovacuum_enabled = off)").execute(&mut conn).await.unwrap();
    // The plan every later call reuses, made now, on the empty table.
    sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut conn).await.unwrap();
    sessions_rows_read_by_a_login(&mut conn, a.id, T0).await;
    for i in 0..300 {
        login(&*db.store, b.id, T0 + i).await;
    }
    // The user has one live session (the device limit); the next login reads it, the
    // new one and the evicted one's row, not the other user's 300.
    let read = sessions_rows_read_by_a_login(&mut conn, a.id, T0 + 1).await;
    assert!(read <= 10, "a login read {read} rows of sessions");
}
