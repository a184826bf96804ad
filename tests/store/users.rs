//! Users: creation, lookup, the admin list, admin patches and password changes.

use gatehouse::domain::user::{Role, Status};
use gatehouse::store::{NewUser, Patched, UserFilter, UserPatch};
use serde_json::json;
use uuid::Uuid;

use crate::both_backends;
use crate::support::*;

both_backends!(
    a_new_user_is_active_with_the_given_details_and_empty_metadata,
    a_taken_email_creates_nothing_and_keeps_the_first_user,
    registering_a_new_email_creates_the_user_and_records_the_registration,
    registering_a_taken_email_creates_nothing_and_records_the_attempt_on_the_account,
    users_are_found_by_id_and_by_email_and_unknown_ones_are_not,
    the_user_list_pages_in_id_order_with_limit_and_after,
    the_email_filter_matches_a_substring_with_percent_underscore_and_backslash_taken_literally,
    the_status_filter_matches_exactly_and_combines_with_the_email_filter,
    a_patch_changes_only_the_fields_it_names,
    a_patch_to_a_non_active_state_ends_the_users_live_sessions_and_returns_their_ids,
    a_patch_of_an_unknown_user_returns_not_found,
    the_last_active_admin_keeps_the_role_and_the_active_state,
    two_admins_demoting_each_other_at_once_on_two_instances_leave_one,
    changing_the_password_ends_every_other_session_and_supersedes_reset_links,
);

fn ordered_id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + n)
}

async fn a_new_user_is_active_with_the_given_details_and_empty_metadata(b: Backend) {
    let db = Db::new(b).await;
    let mut nu = new_user("ada@example.test");
    nu.role = Role::Admin;
    nu.email_verified_at = Some(T0 - 5);
    let created = db.store.create_user(nu.clone()).await.unwrap().unwrap();
    assert_eq!(created.id, nu.id);
    assert_eq!(created.email, "ada@example.test");
    assert_eq!(created.name.as_deref(), Some("Test User"));
    assert_eq!(created.password_hash, nu.password_hash);
    assert_eq!(created.role, Role::Admin);
    assert_eq!(created.status, Status::Active);
    assert_eq!(created.email_verified_at, Some(T0 - 5));
    assert_eq!(created.created_at, T0);
    assert_eq!(created.updated_at, T0);
    assert_eq!(created.last_login_at, None);
    assert_eq!(created.last_login_geolocation, None);
    assert_eq!(created.metadata, json!({}));

    let bare = db
        .store
        .create_user(NewUser { name: None, password_hash: None, ..new_user("bare@example.test") })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bare.name, None);
    assert_eq!(bare.password_hash, None);
    assert_eq!(bare.role, Role::User);
    assert!(!bare.email_verified());
}

async fn a_taken_email_creates_nothing_and_keeps_the_first_user(b: Backend) {
    let db = Db::new(b).await;
    let first = user(&*db.store, "taken@example.test").await;
    let second = NewUser { name: Some("Impostor".into()), ..new_user("taken@example.test") };
    let second_id = second.id;
    assert!(db.store.create_user(second).await.unwrap().is_none());
    assert!(db.store.user_by_id(second_id).await.unwrap().is_none());
    let kept = db.store.user_by_email("taken@example.test").await.unwrap().unwrap();
    assert_eq!(kept.id, first.id);
    assert_eq!(kept.name.as_deref(), Some("Test User"));
}

async fn users_are_found_by_id_and_by_email_and_unknown_ones_are_not(b: Backend) {
    let db = Db::new(b).await;
    let a = user(&*db.store, "a@example.test").await;
    let b2 = user(&*db.store, "b@example.test").await;
    let by_id = db.store.user_by_id(a.id).await.unwrap().unwrap();
    assert_eq!(by_id.email, "a@example.test");
    let by_email = db.store.user_by_email("b@example.test").await.unwrap().unwrap();
    assert_eq!(by_email.id, b2.id);
    assert!(db.store.user_by_id(Uuid::new_v4()).await.unwrap().is_none());
    assert!(db.store.user_by_email("nobody@example.test").await.unwrap().is_none());
}

async fn the_user_list_pages_in_id_order_with_limit_and_after(b: Backend) {
    let db = Db::new(b).await;
    // Created out of id order: the list is ordered by id, not by insertion.
    for n in [3u128, 1, 5, 2, 4] {
        db.store
            .create_user(NewUser { id: ordered_id(n), ..new_user(&format!("u{n}@example.test")) })
            .await
            .unwrap()
            .unwrap();
    }
    let page = |after: Option<Uuid>, limit: u32| UserFilter { limit, after, ..UserFilter::default() };
    let ids = |users: Vec<gatehouse::domain::user::User>| -> Vec<Uuid> { users.into_iter().map(|u| u.id).collect() };
    let p1 = ids(db.store.list_users(&page(None, 2)).await.unwrap());
    assert_eq!(p1, vec![ordered_id(1), ordered_id(2)]);
    let p2 = ids(db.store.list_users(&page(Some(p1[1]), 2)).await.unwrap());
    assert_eq!(p2, vec![ordered_id(3), ordered_id(4)]);
    let p3 = ids(db.store.list_users(&page(Some(p2[1]), 2)).await.unwrap());
    assert_eq!(p3, vec![ordered_id(5)]);
    let p4 = ids(db.store.list_users(&page(Some(p3[0]), 2)).await.unwrap());
    assert!(p4.is_empty());
    let all = ids(db.store.list_users(&page(None, 100)).await.unwrap());
    assert_eq!(all, (1..=5).map(ordered_id).collect::<Vec<_>>());
}

async fn the_email_filter_matches_a_substring_with_percent_underscore_and_backslash_taken_literally(b: Backend) {
    let db = Db::new(b).await;
    for email in [
        "a_b@example.test",
        "axb@example.test",
        "50%off@example.test",
        "50xoff@example.test",
        "back\\slash@example.test",
        "backxslash@example.test",
        "plain@other.test",
    ] {
        user(&*db.store, email).await;
    }
    let emails = |filter: &str| {
        let store = db.store.clone();
        let f = UserFilter { email: Some(filter.to_owned()), limit: 100, ..UserFilter::default() };
        async move {
            let mut v: Vec<String> = store.list_users(&f).await.unwrap().into_iter().map(|u| u.email).collect();
            v.sort();
            v
        }
    };
    assert_eq!(emails("_").await, vec!["a_b@example.test"]);
    assert_eq!(emails("a_b").await, vec!["a_b@example.test"]);
    assert_eq!(emails("%").await, vec!["50%off@example.test"]);
    assert_eq!(emails("50%o").await, vec!["50%off@example.test"]);
    assert_eq!(emails("\\").await, vec!["back\\slash@example.test"]);
    assert_eq!(emails("k\\s").await, vec!["back\\slash@example.test"]);
    assert_eq!(emails("xoff").await, vec!["50xoff@example.test"], "a plain substring anywhere in the email");
    assert_eq!(emails("@example.test").await.len(), 6);
    assert_eq!(emails("other.test").await, vec!["plain@other.test"]);
    assert!(emails("nomatch").await.is_empty());
}

async fn the_status_filter_matches_exactly_and_combines_with_the_email_filter(b: Backend) {
    let db = Db::new(b).await;
    let a = user(&*db.store, "active-a@example.test").await;
    let s1 = user(&*db.store, "suspended-a@example.test").await;
    let s2 = user(&*db.store, "suspended-b@example.test").await;
    let d = user(&*db.store, "deleted-a@example.test").await;
    for (id, status) in [(s1.id, Status::Suspended), (s2.id, Status::Suspended), (d.id, Status::Deleted)] {
        let patch = UserPatch { status: Some(status), ..UserPatch::default() };
        db.store.patch_user(id, &patch, T0 + 1).await.unwrap().changed().unwrap();
    }
    let list = |email: Option<&str>, status: Option<Status>| {
        let store = db.store.clone();
        let f = UserFilter { email: email.map(str::to_owned), status, limit: 100, after: None };
        async move {
            let mut v: Vec<Uuid> = store.list_users(&f).await.unwrap().into_iter().map(|u| u.id).collect();
            v.sort();
            v
        }
    };
    let mut suspended = vec![s1.id, s2.id];
    suspended.sort();
    assert_eq!(list(None, Some(Status::Suspended)).await, suspended);
    assert_eq!(list(None, Some(Status::Active)).await, vec![a.id]);
    assert_eq!(list(None, Some(Status::Deleted)).await, vec![d.id]);
    assert!(list(None, Some(Status::Deactivated)).await.is_empty());
    assert_eq!(list(Some("-b@"), Some(Status::Suspended)).await, vec![s2.id]);
    assert!(list(Some("active"), Some(Status::Suspended)).await.is_empty());
    assert_eq!(list(None, None).await.len(), 4);
}

async fn a_patch_changes_only_the_fields_it_names(b: Backend) {
    let db = Db::new(b).await;
    // Another admin, so that this one may be unverified below.
    admin(&*db.store, "other-admin@example.test").await;
    let u = user(&*db.store, "patch@example.test").await;

    let (p, ended) = db
        .store
        .patch_user(
            u.id,
            &UserPatch {
                role: Some(Role::Admin),
                email_verified: Some(true),
                metadata: Some(json!({"team": "blue", "n": 3})),
                ..UserPatch::default()
            },
            T0 + 10,
        )
        .await
        .unwrap()
        .changed()
        .unwrap();
    assert!(ended.is_empty());
    assert_eq!(p.role, Role::Admin);
    assert_eq!(p.email_verified_at, Some(T0 + 10));
    assert_eq!(p.metadata, json!({"team": "blue", "n": 3}));
    assert_eq!(p.name.as_deref(), Some("Test User"), "name left alone");
    assert_eq!(p.status, Status::Active, "status left alone");
    assert_eq!(p.updated_at, T0 + 10);

    // Verifying again keeps the first verification time.
    let verify_again = UserPatch { email_verified: Some(true), ..UserPatch::default() };
    let (p, _) = db.store.patch_user(u.id, &verify_again, T0 + 20).await.unwrap().changed().unwrap();
    assert_eq!(p.email_verified_at, Some(T0 + 10));

    let (p, _) = db
        .store
        .patch_user(u.id, &UserPatch { name: Some(Some("Renamed".into())), ..UserPatch::default() }, T0 + 30)
        .await
        .unwrap()
        .changed()
        .unwrap();
    assert_eq!(p.name.as_deref(), Some("Renamed"));
    assert_eq!(p.role, Role::Admin);
    assert_eq!(p.metadata, json!({"team": "blue", "n": 3}));

    let (p, _) = db
        .store
        .patch_user(u.id, &UserPatch { name: Some(None), email_verified: Some(false), ..UserPatch::default() }, T0 + 40)
        .await
        .unwrap()
        .changed()
        .unwrap();
    assert_eq!(p.name, None, "Some(None) clears the name");
    assert_eq!(p.email_verified_at, None, "unverified");
    assert_eq!(p.role, Role::Admin);
    assert_eq!(p.password_hash, u.password_hash);
    assert_eq!(p.email, u.email);

    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.name, None);
    assert_eq!(stored.updated_at, T0 + 40);
}

async fn a_patch_to_a_non_active_state_ends_the_users_live_sessions_and_returns_their_ids(b: Backend) {
    let db = Db::new(b).await;
    for status in [Status::Suspended, Status::Deactivated, Status::Deleted] {
        let u = user(&*db.store, &format!("{}@example.test", status.as_str())).await;
        let other = user(&*db.store, &format!("other-{}@example.test", status.as_str())).await;
        let s1 = login(&*db.store, u.id, T0).await;
        let s2 = login(&*db.store, u.id, T0 + 1).await;
        let gone = login(&*db.store, u.id, T0 + 2).await;
        assert!(logout(&*db.store, u.id, gone.id, T0 + 3).await);
        let kept = login(&*db.store, other.id, T0).await;

        let (p, mut ended) = db
            .store
            .patch_user(u.id, &UserPatch { status: Some(status), ..UserPatch::default() }, T0 + 10)
            .await
            .unwrap()
            .changed()
            .unwrap();
        assert_eq!(p.status, status);
        ended.sort();
        let mut expected = vec![s1.id, s2.id];
        expected.sort();
        assert_eq!(ended, expected, "only the live sessions, {status:?}");
        assert!(db.store.list_sessions(u.id, T0 + 10).await.unwrap().is_empty());
        let (s, _) = db.store.session_with_user(s1.id).await.unwrap().unwrap();
        assert_eq!(s.ended_at, Some(T0 + 10));
        let others = db.store.list_sessions(other.id, T0 + 10).await.unwrap();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].id, kept.id);

        // Back to active ends nothing further and does not revive sessions.
        let (p, ended) = db
            .store
            .patch_user(u.id, &UserPatch { status: Some(Status::Active), ..UserPatch::default() }, T0 + 20)
            .await
            .unwrap()
            .changed()
            .unwrap();
        assert_eq!(p.status, Status::Active);
        assert!(ended.is_empty());
        assert!(db.store.list_sessions(u.id, T0 + 20).await.unwrap().is_empty());
    }

    // A patch that leaves the state alone ends nothing.
    let u = user(&*db.store, "keeps@example.test").await;
    login(&*db.store, u.id, T0).await;
    let (_, ended) = db
        .store
        .patch_user(u.id, &UserPatch { role: Some(Role::Admin), ..UserPatch::default() }, T0 + 5)
        .await
        .unwrap()
        .changed()
        .unwrap();
    assert!(ended.is_empty());
    assert_eq!(db.store.list_sessions(u.id, T0 + 5).await.unwrap().len(), 1);
}

async fn a_patch_of_an_unknown_user_returns_not_found(b: Backend) {
    let db = Db::new(b).await;
    let patch = UserPatch { status: Some(Status::Suspended), ..UserPatch::default() };
    assert!(matches!(db.store.patch_user(Uuid::new_v4(), &patch, T0).await.unwrap(), Patched::NotFound));
}

async fn admin(store: &dyn gatehouse::store::Store, email: &str) -> Uuid {
    let mut nu = new_user(email);
    nu.role = Role::Admin;
    nu.email_verified_at = Some(T0);
    store.create_user(nu).await.unwrap().unwrap().id
}

async fn the_last_active_admin_keeps_the_role_and_the_active_state(b: Backend) {
    let db = Db::new(b).await;
    let a = admin(&*db.store, "only-admin@example.test").await;
    let session = login(&*db.store, a, T0).await;
    let demote = UserPatch { role: Some(Role::User), ..UserPatch::default() };
    for change in [
        demote.clone(),
        UserPatch { status: Some(Status::Suspended), ..UserPatch::default() },
        UserPatch { status: Some(Status::Deactivated), ..UserPatch::default() },
        UserPatch { status: Some(Status::Deleted), name: Some(Some("Gone".into())), ..UserPatch::default() },
        // Unverified, it could not log in to act as one.
        UserPatch { email_verified: Some(false), ..UserPatch::default() },
    ] {
        assert!(matches!(db.store.patch_user(a, &change, T0 + 1).await.unwrap(), Patched::LastAdmin), "{change:?}");
    }
    // Nothing of a refused change was kept: not its other fields, not its session ends.
    let kept = db.store.user_by_id(a).await.unwrap().unwrap();
    assert_eq!((kept.role, kept.status, kept.name.as_deref()), (Role::Admin, Status::Active, Some("Test User")));
    assert_eq!(db.store.list_sessions(a, T0 + 1).await.unwrap().len(), 1);
    assert_eq!(db.store.list_sessions(a, T0 + 1).await.unwrap()[0].id, session.id);
    // What leaves it an active admin is made.
    let same = UserPatch { role: Some(Role::Admin), status: Some(Status::Active), ..UserPatch::default() };
    assert!(matches!(db.store.patch_user(a, &same, T0 + 2).await.unwrap(), Patched::Changed(..)));
    // With a second active admin, either may go, but not both.
    let b2 = admin(&*db.store, "second-admin@example.test").await;
    assert!(matches!(db.store.patch_user(a, &demote, T0 + 3).await.unwrap(), Patched::Changed(..)));
    assert!(matches!(db.store.patch_user(b2, &demote, T0 + 4).await.unwrap(), Patched::LastAdmin));
    // A suspended admin is no admin left: suspending the other is refused too.
    let promote = UserPatch { role: Some(Role::Admin), ..UserPatch::default() };
    assert!(matches!(db.store.patch_user(a, &promote, T0 + 5).await.unwrap(), Patched::Changed(..)));
    let suspend = UserPatch { status: Some(Status::Suspended), ..UserPatch::default() };
    assert!(matches!(db.store.patch_user(a, &suspend, T0 + 6).await.unwrap(), Patched::Changed(..)));
    assert!(matches!(db.store.patch_user(b2, &suspend, T0 + 7).await.unwrap(), Patched::LastAdmin));
    // An unverified admin is none either: b2 is the one left.
    assert!(matches!(
        db.store
            .patch_user(a, &UserPatch { status: Some(Status::Active), ..UserPatch::default() }, T0 + 8)
            .await
            .unwrap(),
        Patched::Changed(..)
    ));
    let unverify = UserPatch { email_verified: Some(false), ..UserPatch::default() };
    assert!(matches!(db.store.patch_user(a, &unverify, T0 + 8).await.unwrap(), Patched::Changed(..)));
    assert!(matches!(db.store.patch_user(b2, &demote, T0 + 8).await.unwrap(), Patched::LastAdmin));
    // Users who are not admins change freely, whatever the admins.
    let u = user(&*db.store, "plain@example.test").await;
    assert!(matches!(db.store.patch_user(u.id, &suspend, T0 + 8).await.unwrap(), Patched::Changed(..)));
}

/// The rule holds across instances: two admins demoting each other (on PostgreSQL on
/// two instances of the store), each change alone allowed, never leave none.
async fn two_admins_demoting_each_other_at_once_on_two_instances_leave_one(b: Backend) {
    let db = Db::new(b).await;
    let other = db.another_instance().await;
    let (a, c) = (admin(&*db.store, "admin-a@example.test").await, admin(&*db.store, "admin-c@example.test").await);
    let demote = UserPatch { role: Some(Role::User), ..UserPatch::default() };
    let promote = UserPatch { role: Some(Role::Admin), ..UserPatch::default() };
    for round in 0..20 {
        let (x, y) =
            tokio::join!(db.store.patch_user(a, &demote, T0 + round), other.patch_user(c, &demote, T0 + round));
        let made = [x.unwrap(), y.unwrap()].iter().filter(|p| matches!(p, Patched::Changed(..))).count();
        assert_eq!(made, 1, "round {round}: exactly one of the two demotions");
        let admins = db.store.list_users(&UserFilter { limit: 10, ..UserFilter::default() }).await.unwrap();
        assert_eq!(admins.iter().filter(|u| u.role == Role::Admin).count(), 1, "round {round}");
        for id in [a, c] {
            assert!(matches!(db.store.patch_user(id, &promote, T0 + round).await.unwrap(), Patched::Changed(..)));
        }
    }
}

async fn changing_the_password_ends_every_other_session_and_supersedes_reset_links(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "change@example.test").await;
    let other = user(&*db.store, "bystander@example.test").await;
    let current = login(&*db.store, u.id, T0).await;
    let s2 = login(&*db.store, u.id, T0 + 1).await;
    let s3 = login(&*db.store, u.id, T0 + 2).await;
    let bystander = login(&*db.store, other.id, T0).await;
    let (reset_secret, reset) = one_time(T0 + 3600);
    db.store.issue_reset(u.id, &reset, T0).await.unwrap();

    let mut ended = db.store.change_password(u.id, "new-hash", Some(current.id), T0 + 10).await.unwrap();
    ended.sort();
    let mut expected = vec![s2.id, s3.id];
    expected.sort();
    assert_eq!(ended, expected);
    let live: Vec<Uuid> = db.store.list_sessions(u.id, T0 + 10).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(live, vec![current.id]);
    assert_eq!(db.store.list_sessions(other.id, T0 + 10).await.unwrap()[0].id, bystander.id);
    let stored = db.store.user_by_id(u.id).await.unwrap().unwrap();
    assert_eq!(stored.password_hash.as_deref(), Some("new-hash"));
    assert_eq!(stored.updated_at, T0 + 10);
    assert!(
        db.store
            .reset_password(&gatehouse::crypto::tokens::hash_token(&reset_secret), "other-hash", T0 + 11)
            .await
            .unwrap()
            .is_none(),
        "a reset link mailed before the change no longer works"
    );

    // Without `keep`, every session ends.
    let ended = db.store.change_password(u.id, "newer-hash", None, T0 + 20).await.unwrap();
    assert_eq!(ended, vec![current.id]);
    assert!(db.store.list_sessions(u.id, T0 + 20).await.unwrap().is_empty());
}

async fn registering_a_new_email_creates_the_user_and_records_the_registration(b: Backend) {
    let db = Db::new(b).await;
    let nu = new_user("reg@example.test");
    let created =
        db.store.register(nu.clone(), Some("203.0.113.9".into()), Some("browser/1".into())).await.unwrap().unwrap();
    assert_eq!(created.id, nu.id);
    assert_eq!(created.email, "reg@example.test");
    assert_eq!(created.status, Status::Active);
    assert_eq!(created.created_at, T0);
    assert_eq!(created.password_hash, nu.password_hash);
    assert_eq!(created.metadata, json!({}));
    assert_eq!(db.store.user_by_email("reg@example.test").await.unwrap().unwrap().id, nu.id);
    let events = db.store.list_events(nu.id, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.kind, "registered");
    assert_eq!(e.user_id, Some(nu.id));
    assert_eq!(e.email.as_deref(), Some("reg@example.test"));
    assert_eq!(e.at, T0);
    assert_eq!(e.ip.as_deref(), Some("203.0.113.9"));
    assert_eq!(e.user_agent.as_deref(), Some("browser/1"));
}

async fn registering_a_taken_email_creates_nothing_and_records_the_attempt_on_the_account(b: Backend) {
    let db = Db::new(b).await;
    let first = user(&*db.store, "taken@example.test").await;
    let second = NewUser { now: T0 + 50, name: Some("Impostor".into()), ..new_user("taken@example.test") };
    let second_id = second.id;
    assert!(db.store.register(second, Some("198.51.100.4".into()), None).await.unwrap().is_none());
    assert!(db.store.user_by_id(second_id).await.unwrap().is_none());
    let kept = db.store.user_by_id(first.id).await.unwrap().unwrap();
    assert_eq!(kept.name.as_deref(), Some("Test User"));
    let events = db.store.list_events(first.id, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "registration_attempt");
    assert_eq!(events[0].at, T0 + 50);
    assert_eq!(events[0].ip.as_deref(), Some("198.51.100.4"));
    assert_eq!(events[0].user_agent, None);
    assert!(db.store.list_events(second_id, 10).await.unwrap().is_empty());
}

/// SQLite's hot paths open connections of their own to the database file, and an
/// identity service in memory would lose every account at exit: a URL without a file is
/// refused at start-up with a message that says so.
#[tokio::test]
async fn an_in_memory_sqlite_database_is_refused_with_a_clear_message() {
    for url in ["sqlite::memory:", "sqlite://:memory:", "sqlite://", "sqlite://x.db?mode=memory&cache=shared"] {
        let options =
            gatehouse::store::StoreOptions { max_connections: 2, acquire_timeout_secs: 5, session_cache_entries: 0 };
        let err = gatehouse::store::open(url, &options).await.err().unwrap_or_else(|| panic!("{url} was accepted"));
        assert!(err.to_string().contains("SQLite needs a file"), "{url}: {err}");
    }
}
