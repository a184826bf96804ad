//! Sessions: opening (with the device limit), listing, ending one or all.

use gatehouse::domain::user::Status;
use gatehouse::store::UserPatch;
use serde_json::json;
use uuid::Uuid;

use crate::both_backends;
use crate::support::*;

both_backends!(
    opening_a_session_records_the_login_on_the_user,
    a_session_is_found_with_its_user_and_unknown_ones_are_not,
    a_sessions_use_is_recorded_at_most_once_a_minute_and_never_after_it_ended,
    the_session_list_has_only_live_sessions_newest_first,
    the_device_limit_ends_the_oldest_sessions_beyond_it,
    a_session_whose_refresh_token_expired_is_neither_listed_nor_counted,
    a_device_limit_of_zero_keeps_every_session,
    every_session_ended_past_the_device_limit_is_in_the_audit_trail,
    ending_a_session_works_only_for_its_owner_and_only_once,
    ending_a_session_with_its_record_writes_the_event_only_when_it_ended_it,
    ending_all_sessions_keeps_the_one_named_and_touches_no_other_user,
    a_login_checked_against_a_replaced_password_or_an_inactive_account_opens_nothing,
);

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

async fn opening_a_session_records_the_login_on_the_user(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "login@example.test").await;
    let (opened, mut s) = new_session(u.id, T0 + 100);
    s.geolocation = Some(json!({"country": "NZ", "city": "Wellington"}));
    let (after, evicted) = db.store.open_session(&s, 5).await.unwrap().expect("session opened");
    assert!(evicted.is_empty());
    assert_eq!(after.id, u.id);
    assert_eq!(after.last_login_at, Some(T0 + 100));
    assert_eq!(after.last_login_geolocation, Some(json!({"country": "NZ", "city": "Wellington"})));
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.last_login_at, Some(T0 + 100));

    // A later login without a location clears the old one.
    let (_, s2) = new_session(u.id, T0 + 200);
    let (after, _) = db.store.open_session(&s2, 5).await.unwrap().expect("session opened");
    assert_eq!(after.last_login_at, Some(T0 + 200));
    assert_eq!(after.last_login_geolocation, None);

    let live = db.store.list_sessions(u.id, T0 + 200).await.unwrap();
    assert_eq!(live.len(), 2);
    assert_eq!(live[1].id, opened.id);
}

async fn a_sessions_use_is_recorded_at_most_once_a_minute_and_never_after_it_ended(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "touch@example.test").await;
    let opened = login(&*db.store, u.id, T0).await;
    let last_used = || async { db.store.list_sessions(u.id, T0).await.unwrap()[0].last_used_at };
    db.store.touch_session(opened.id, T0 + 59).await.unwrap();
    assert_eq!(last_used().await, T0, "within a minute of the last recorded use");
    db.store.touch_session(opened.id, T0 + 60).await.unwrap();
    assert_eq!(last_used().await, T0 + 60);
    // A late write (a request that read the session before a newer use was recorded)
    // never moves the use back.
    db.store.touch_session(opened.id, T0 + 30).await.unwrap();
    assert_eq!(last_used().await, T0 + 60);
    assert!(logout(&*db.store, u.id, opened.id, T0 + 200).await);
    db.store.touch_session(opened.id, T0 + 300).await.unwrap();
    let (ended, _) = db.store.session_with_user(opened.id).await.unwrap().unwrap();
    assert_eq!(ended.last_used_at, T0 + 60, "an ended session is not touched");
}

async fn a_session_is_found_with_its_user_and_unknown_ones_are_not(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "find@example.test").await;
    let opened = login(&*db.store, u.id, T0).await;
    let (s, owner) = db.store.session_with_user(opened.id).await.unwrap().unwrap();
    assert_eq!(s.id, opened.id);
    assert_eq!(s.user_id, u.id);
    assert_eq!(s.created_at, T0);
    assert_eq!(s.last_used_at, T0);
    assert_eq!(s.expires_at, T0 + SESSION_TTL);
    assert_eq!(s.ip.as_deref(), Some("192.0.2.7"));
    assert_eq!(s.user_agent.as_deref(), Some("store-tests/1"));
    assert_eq!(s.ended_at, None);
    assert!(s.is_live(T0));
    assert_eq!(owner.id, u.id);
    assert_eq!(owner.email, "find@example.test");
    assert!(db.store.session_with_user(Uuid::new_v4()).await.unwrap().is_none());

    // Ended sessions are still found, with their end time.
    assert!(logout(&*db.store, u.id, opened.id, T0 + 5).await);
    let (s, _) = db.store.session_with_user(opened.id).await.unwrap().unwrap();
    assert_eq!(s.ended_at, Some(T0 + 5));
    assert!(!s.is_live(T0 + 5));
}

async fn the_session_list_has_only_live_sessions_newest_first(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "list@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    let oldest = login(&*db.store, u.id, T0).await;
    let ended = login(&*db.store, u.id, T0 + 10).await;
    let (short, mut s) = new_session(u.id, T0 + 20);
    s.expires_at = T0 + 1000;
    s.refresh_expires_at = T0 + 1000;
    db.store.open_session(&s, 0).await.unwrap().expect("session opened");
    let newest = login(&*db.store, u.id, T0 + 30).await;
    login(&*db.store, other.id, T0 + 40).await;
    assert!(logout(&*db.store, u.id, ended.id, T0 + 50).await);

    let ids = |v: Vec<gatehouse::store::Session>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(db.store.list_sessions(u.id, T0 + 999).await.unwrap()), vec![newest.id, short.id, oldest.id]);
    assert_eq!(
        ids(db.store.list_sessions(u.id, T0 + 1000).await.unwrap()),
        vec![newest.id, oldest.id],
        "a session is over at its absolute expiry"
    );
    assert!(db.store.list_sessions(Uuid::new_v4(), T0).await.unwrap().is_empty());
}

async fn the_device_limit_ends_the_oldest_sessions_beyond_it(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "devices@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    let theirs = login(&*db.store, other.id, T0).await;
    let mut opened = Vec::new();
    for i in 0..3 {
        let (o, s) = new_session(u.id, T0 + i);
        let (_, evicted) = db.store.open_session(&s, 3).await.unwrap().expect("session opened");
        assert!(evicted.is_empty());
        opened.push(o);
    }
    let (fourth, s) = new_session(u.id, T0 + 10);
    let (_, evicted) = db.store.open_session(&s, 3).await.unwrap().expect("session opened");
    assert_eq!(evicted, vec![opened[0].id]);
    let (ev, _) = db.store.session_with_user(opened[0].id).await.unwrap().unwrap();
    assert_eq!(ev.ended_at, Some(T0 + 10));

    // A lower limit evicts every session beyond it, oldest first.
    let (fifth, s) = new_session(u.id, T0 + 20);
    let (_, evicted) = db.store.open_session(&s, 2).await.unwrap().expect("session opened");
    assert_eq!(sorted(evicted), sorted(vec![opened[1].id, opened[2].id]));
    let live: Vec<Uuid> = db.store.list_sessions(u.id, T0 + 20).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(live, vec![fifth.id, fourth.id]);
    assert_eq!(
        db.store.list_sessions(other.id, T0 + 20).await.unwrap()[0].id,
        theirs.id,
        "another user's sessions do not count"
    );

    // Ended and expired sessions do not count toward the limit.
    let v = user(&*db.store, "expiring@example.test").await;
    let (_, mut s) = new_session(v.id, T0);
    s.expires_at = T0 + 50;
    s.refresh_expires_at = T0 + 50;
    db.store.open_session(&s, 1).await.unwrap().expect("session opened");
    let gone = login(&*db.store, v.id, T0 + 1).await;
    logout(&*db.store, v.id, gone.id, T0 + 2).await;
    let (_, s) = new_session(v.id, T0 + 60);
    let (_, evicted) = db.store.open_session(&s, 1).await.unwrap().expect("session opened");
    assert!(evicted.is_empty());
}

/// A session unused for longer than its refresh token's life cannot be renewed: the
/// device limit ends no session in use on its account, and the list leaves it out. Its
/// current token counts, not one it rotated.
async fn a_session_whose_refresh_token_expired_is_neither_listed_nor_counted(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "idle@example.test").await;
    // The oldest session, in use: rotated at T0 + 500, its successor lives REFRESH_TTL.
    let in_use = login(&*db.store, u.id, T0).await;
    let (r, _) = rotate(&in_use.refresh, T0 + 500);
    assert!(matches!(db.store.rotate_refresh(&r).await.unwrap(), gatehouse::store::Rotation::Rotated { .. }));
    // Idle: its only token expired at T0 + 100.
    let (idle, mut s) = new_session(u.id, T0 + 10);
    s.refresh_expires_at = T0 + 100;
    db.store.open_session(&s, 0).await.unwrap().expect("session opened");
    // Rotated once at T0 + 20 with a successor that expired at T0 + 150; the rotated
    // token itself would live on, but it is no longer the session's.
    let (rotated_idle, mut s) = new_session(u.id, T0 + 15);
    s.refresh_expires_at = T0 + 5000;
    db.store.open_session(&s, 0).await.unwrap().expect("session opened");
    let (mut r, _) = rotate(&rotated_idle.refresh, T0 + 20);
    r.ttl = 130;
    assert!(matches!(db.store.rotate_refresh(&r).await.unwrap(), gatehouse::store::Rotation::Rotated { .. }));

    let at = T0 + 600;
    let ids = |v: Vec<gatehouse::store::Session>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(db.store.list_sessions(u.id, T0 + 99).await.unwrap()), vec![rotated_idle.id, idle.id, in_use.id]);
    assert_eq!(ids(db.store.list_sessions(u.id, at).await.unwrap()), vec![in_use.id]);
    let (newest, s) = new_session(u.id, at);
    let (_, evicted) = db.store.open_session(&s, 2).await.unwrap().expect("session opened");
    assert!(evicted.is_empty(), "the session in use was ended for idle ones: {evicted:?}");
    assert_eq!(ids(db.store.list_sessions(u.id, at).await.unwrap()), vec![newest.id, in_use.id]);
    let (third, s) = new_session(u.id, at + 1);
    let (_, evicted) = db.store.open_session(&s, 2).await.unwrap().expect("session opened");
    assert_eq!(evicted, vec![in_use.id], "past the limit, the oldest held session ends");
    assert_eq!(ids(db.store.list_sessions(u.id, at + 1).await.unwrap()), vec![third.id, newest.id]);
}

/// Two evictions (a lowered limit), then nine: each one ended and in the audit trail,
/// after the login that caused it.
async fn every_session_ended_past_the_device_limit_is_in_the_audit_trail(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "audited@example.test").await;
    let mut opened = Vec::new();
    for i in 0..3 {
        opened.push(login(&*db.store, u.id, T0 + i).await.id);
    }
    let ended_in_trail = |events: &[gatehouse::store::Event]| -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = events
            .iter()
            .filter(|e| e.kind == "session_ended")
            .map(|e| {
                assert_eq!(e.detail["reason"], "evicted");
                e.detail["session_id"].as_str().unwrap().parse().unwrap()
            })
            .collect();
        ids.sort();
        ids
    };
    for (limit, at, expected_gone) in [(2, T0 + 10, 2), (1, T0 + 20, 9)] {
        // Before the second round, seven sessions without a limit.
        if expected_gone == 9 {
            for i in 0..7 {
                opened.push(login(&*db.store, u.id, at - 10 + i).await.id);
            }
        }
        let live_before: Vec<Uuid> =
            db.store.list_sessions(u.id, at).await.unwrap().into_iter().map(|s| s.id).collect();
        let (_, s) = new_session(u.id, at);
        let (_, evicted) = db.store.open_session(&s, limit).await.unwrap().expect("session opened");
        assert_eq!(live_before.len() + 1 - limit as usize, expected_gone);
        assert_eq!(evicted.len(), expected_gone, "limit {limit}");
        assert!(evicted.iter().all(|id| live_before.contains(id)));
        let events = db.store.list_events(u.id, 100).await.unwrap();
        let newest: Vec<&str> = events.iter().take(expected_gone + 1).map(|e| e.kind.as_str()).collect();
        assert_eq!(newest.last(), Some(&"login"), "the login comes before its evictions: {newest:?}");
        assert!(newest[..expected_gone].iter().all(|k| *k == "session_ended"), "{newest:?}");
        assert_eq!(events[expected_gone].detail["session_id"], s.id.to_string());
        let trail = ended_in_trail(&events[..expected_gone]);
        assert_eq!(trail, sorted(evicted), "limit {limit}");
        assert_eq!(db.store.list_sessions(u.id, at).await.unwrap().len(), limit as usize);
    }
}

async fn a_device_limit_of_zero_keeps_every_session(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "many@example.test").await;
    for i in 0..12 {
        let (_, s) = new_session(u.id, T0 + i);
        let (_, evicted) = db.store.open_session(&s, 0).await.unwrap().expect("session opened");
        assert!(evicted.is_empty());
    }
    assert_eq!(db.store.list_sessions(u.id, T0 + 20).await.unwrap().len(), 12);
}

async fn ending_a_session_works_only_for_its_owner_and_only_once(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "owner@example.test").await;
    let intruder = user(&*db.store, "intruder@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    assert!(!logout(&*db.store, intruder.id, s.id, T0 + 1).await);
    assert_eq!(db.store.list_sessions(u.id, T0 + 1).await.unwrap().len(), 1);
    assert!(logout(&*db.store, u.id, s.id, T0 + 2).await);
    assert!(!logout(&*db.store, u.id, s.id, T0 + 3).await);
    let (ended, _) = db.store.session_with_user(s.id).await.unwrap().unwrap();
    assert_eq!(ended.ended_at, Some(T0 + 2), "the first end time stays");
    assert!(!logout(&*db.store, u.id, Uuid::new_v4(), T0 + 3).await);
}

async fn ending_a_session_with_its_record_writes_the_event_only_when_it_ended_it(b: Backend) {
    use gatehouse::store::Event;
    let db = Db::new(b).await;
    let u = user(&*db.store, "recorded@example.test").await;
    let intruder = user(&*db.store, "nosy@example.test").await;
    let s = login(&*db.store, u.id, T0).await;
    let event = |who: Uuid, at| Event {
        user_id: Some(who),
        email: None,
        kind: "session_ended".into(),
        at,
        ip: Some("192.0.2.9".into()),
        user_agent: Some("agent/1".into()),
        detail: json!({"session_id": s.id, "reason": "logout"}),
    };
    for (who, at, ends) in [(intruder.id, T0 + 1, false), (u.id, T0 + 2, true), (u.id, T0 + 3, false)] {
        let ended = db.store.end_session(who, s.id, "logout", &event(who, at)).await.unwrap();
        assert_eq!(ended, ends, "at {at}");
    }
    let (session, _) = db.store.session_with_user(s.id).await.unwrap().unwrap();
    assert_eq!(session.ended_at, Some(T0 + 2));
    let ends: Vec<Event> =
        db.store.list_events(u.id, 100).await.unwrap().into_iter().filter(|e| e.kind == "session_ended").collect();
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(
        (ends[0].at, ends[0].ip.as_deref(), ends[0].user_agent.as_deref()),
        (T0 + 2, Some("192.0.2.9"), Some("agent/1"))
    );
    assert_eq!(ends[0].detail, json!({"session_id": s.id, "reason": "logout"}));
    assert!(db.store.list_events(intruder.id, 100).await.unwrap().is_empty());
}

async fn ending_all_sessions_keeps_the_one_named_and_touches_no_other_user(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "all@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    let keep = login(&*db.store, u.id, T0).await;
    let s2 = login(&*db.store, u.id, T0 + 1).await;
    let s3 = login(&*db.store, u.id, T0 + 2).await;
    let already = login(&*db.store, u.id, T0 + 3).await;
    logout(&*db.store, u.id, already.id, T0 + 4).await;
    let theirs = login(&*db.store, other.id, T0).await;

    let ended = db.store.end_sessions(u.id, Some(keep.id), "logout_others", T0 + 10).await.unwrap();
    assert_eq!(sorted(ended), sorted(vec![s2.id, s3.id]));
    let live: Vec<Uuid> = db.store.list_sessions(u.id, T0 + 10).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(live, vec![keep.id]);
    let (s, _) = db.store.session_with_user(already.id).await.unwrap().unwrap();
    assert_eq!(s.ended_at, Some(T0 + 4), "already ended stays as it was");

    // Another user's session named as `keep` changes nothing for them.
    let ended = db.store.end_sessions(u.id, Some(theirs.id), "logout_all", T0 + 20).await.unwrap();
    assert_eq!(ended, vec![keep.id]);
    assert!(db.store.list_sessions(u.id, T0 + 20).await.unwrap().is_empty());
    assert_eq!(db.store.list_sessions(other.id, T0 + 20).await.unwrap()[0].id, theirs.id);

    let ended = db.store.end_sessions(other.id, None, "logout_all", T0 + 30).await.unwrap();
    assert_eq!(ended, vec![theirs.id]);
    assert!(db.store.end_sessions(other.id, None, "logout_all", T0 + 31).await.unwrap().is_empty());
}

async fn a_login_checked_against_a_replaced_password_or_an_inactive_account_opens_nothing(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "stale@example.test").await;
    let (_, mut s) = new_session(u.id, T0);
    s.verified_hash = u.password_hash.clone();
    // A reset wins the race: the password this login checked is no longer the one stored.
    db.store.change_password(u.id, "$argon2id$v=19$m=8,t=1,p=1$bmV3$bmV3", None, T0).await.unwrap();
    assert!(db.store.open_session(&s, 0).await.unwrap().is_none());
    assert!(db.store.list_sessions(u.id, T0).await.unwrap().is_empty());
    assert_eq!(db.store.user_by_id(u.id).await.unwrap().unwrap().last_login_at, None);

    let v = user(&*db.store, "gone@example.test").await;
    let patch = UserPatch { status: Some(Status::Suspended), ..UserPatch::default() };
    db.store.patch_user(v.id, &patch, T0).await.unwrap();
    let (_, mut s) = new_session(v.id, T0);
    s.verified_hash = v.password_hash.clone();
    assert!(db.store.open_session(&s, 0).await.unwrap().is_none());
}
