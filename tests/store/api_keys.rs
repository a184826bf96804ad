//! API keys: creation, listing, revocation, lookup by hash with expiry.

use gatehouse::crypto::tokens::{hash_token, new_api_key};
use gatehouse::store::{ApiKey, Store};
use uuid::Uuid;

use crate::both_backends;
use crate::support::*;

both_backends!(
    a_key_is_found_by_its_hash_with_its_user_until_it_expires,
    a_key_without_expiry_never_expires,
    a_keys_use_is_recorded_at_most_once_a_minute,
    the_key_list_has_the_owners_unrevoked_keys_oldest_first,
    a_key_is_revoked_only_by_its_owner_and_only_once,
);

/// Stores a new key for `user_id`; returns the secret and the record.
async fn new_key(
    store: &dyn Store,
    user_id: Uuid,
    name: &str,
    created_at: i64,
    expires_at: Option<i64>,
) -> (String, ApiKey) {
    let (secret, prefix) = new_api_key();
    let k = ApiKey {
        id: Uuid::new_v4(),
        user_id,
        name: name.to_owned(),
        prefix,
        created_at,
        expires_at,
        last_used_at: None,
    };
    assert!(store.create_api_key(&k, &hash_token(&secret), 50).await.unwrap());
    (secret, k)
}

async fn a_key_is_found_by_its_hash_with_its_user_until_it_expires(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "keys@example.test").await;
    let (secret, k) = new_key(&*db.store, u.id, "ci", T0, Some(T0 + 100)).await;
    let (found, owner) = db.store.api_key_user(&hash_token(&secret), T0 + 99).await.unwrap().unwrap();
    assert_eq!(found.id, k.id);
    assert_eq!(found.user_id, u.id);
    assert_eq!(found.name, "ci");
    assert_eq!(found.prefix, k.prefix);
    assert!(secret.starts_with(&found.prefix));
    assert_eq!(found.created_at, T0);
    assert_eq!(found.expires_at, Some(T0 + 100));
    assert_eq!(owner.id, u.id);
    assert_eq!(owner.email, "keys@example.test");
    for at in [T0 + 100, T0 + 101] {
        assert!(db.store.api_key_user(&hash_token(&secret), at).await.unwrap().is_none());
    }
    assert!(db.store.api_key_user(&hash_token("gh_00000000_unknown"), T0).await.unwrap().is_none());
    assert!(db.store.api_key_user(&secret, T0).await.unwrap().is_none(), "the key itself is not its hash");
}

async fn a_key_without_expiry_never_expires(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "forever@example.test").await;
    let (secret, k) = new_key(&*db.store, u.id, "forever", T0, None).await;
    let (found, _) = db.store.api_key_user(&hash_token(&secret), T0 + 20 * 365 * 86_400).await.unwrap().unwrap();
    assert_eq!(found.id, k.id);
    assert_eq!(found.expires_at, None);
}

async fn a_keys_use_is_recorded_at_most_once_a_minute(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "usage@example.test").await;
    let (secret, _) = new_key(&*db.store, u.id, "usage", T0, None).await;
    let h = hash_token(&secret);
    let last_used = || async { db.store.list_api_keys(u.id).await.unwrap()[0].last_used_at };
    assert_eq!(last_used().await, None);
    db.store.api_key_user(&h, T0 + 10).await.unwrap().unwrap();
    assert_eq!(last_used().await, Some(T0 + 10));
    let (seen, _) = db.store.api_key_user(&h, T0 + 30).await.unwrap().unwrap();
    assert_eq!(seen.last_used_at, Some(T0 + 10));
    assert_eq!(last_used().await, Some(T0 + 10), "within the minute");
    db.store.api_key_user(&h, T0 + 69).await.unwrap().unwrap();
    assert_eq!(last_used().await, Some(T0 + 10));
    db.store.api_key_user(&h, T0 + 70).await.unwrap().unwrap();
    assert_eq!(last_used().await, Some(T0 + 70));
}

async fn the_key_list_has_the_owners_unrevoked_keys_oldest_first(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "list@example.test").await;
    let other = user(&*db.store, "other@example.test").await;
    let (_, newer) = new_key(&*db.store, u.id, "newer", T0 + 10, None).await;
    let (_, older) = new_key(&*db.store, u.id, "older", T0, Some(T0 + 5)).await;
    let (_, revoked) = new_key(&*db.store, u.id, "revoked", T0 + 5, None).await;
    new_key(&*db.store, other.id, "theirs", T0, None).await;
    assert!(db.store.revoke_api_key(u.id, revoked.id, T0 + 20).await.unwrap());
    let listed = db.store.list_api_keys(u.id).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, vec!["older", "newer"], "expired keys are still listed");
    assert_eq!(listed[0].id, older.id);
    assert_eq!(listed[0].expires_at, Some(T0 + 5));
    assert_eq!(listed[1].id, newer.id);
    assert_eq!(listed[1].prefix, newer.prefix);
    assert!(db.store.list_api_keys(Uuid::new_v4()).await.unwrap().is_empty());
}

async fn a_key_is_revoked_only_by_its_owner_and_only_once(b: Backend) {
    let db = Db::new(b).await;
    let u = user(&*db.store, "owner@example.test").await;
    let intruder = user(&*db.store, "intruder@example.test").await;
    let (secret, k) = new_key(&*db.store, u.id, "k", T0, None).await;
    assert!(!db.store.revoke_api_key(intruder.id, k.id, T0 + 1).await.unwrap());
    assert!(db.store.api_key_user(&hash_token(&secret), T0 + 1).await.unwrap().is_some());
    assert!(db.store.revoke_api_key(u.id, k.id, T0 + 2).await.unwrap());
    assert!(!db.store.revoke_api_key(u.id, k.id, T0 + 3).await.unwrap());
    assert!(!db.store.revoke_api_key(u.id, Uuid::new_v4(), T0 + 3).await.unwrap());
    assert!(db.store.api_key_user(&hash_token(&secret), T0 + 3).await.unwrap().is_none());
    assert!(db.store.list_api_keys(u.id).await.unwrap().is_empty());
}
