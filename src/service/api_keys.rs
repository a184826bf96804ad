//! API keys for server-to-server calls: `gh_<prefix>_<secret>`, shown once at
//! creation, stored as SHA-256, sent as `X-API-Key`. A key acts for its owner on
//! `GET /v1/me`; it stops at once when revoked, expired, or its owner is not active.

use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{required, Caller, Checks, ClientMeta, Error, Result, Services};
use crate::crypto::tokens;
use crate::domain::user::Status;
use crate::domain::FieldError;
use crate::store::ApiKey;

/// Most keys one user may hold.
pub const MAX_KEYS_PER_USER: u32 = 50;

/// `POST /v1/me/api-keys`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewApiKeyInput {
    /// A name to recognise the key by (1 to 100 characters).
    pub name: Option<String>,
    /// Lifetime in seconds; none means the key does not expire.
    pub expires_in: Option<i64>,
}

impl Services {
    /// Creates a key; returns its record and the key itself (shown only now).
    pub async fn create_api_key(
        &self,
        caller: &Caller,
        input: NewApiKeyInput,
        meta: &ClientMeta,
    ) -> Result<(ApiKey, String)> {
        let mut c = Checks::default();
        let name = c.take(required(input.name, "name").and_then(|n| {
            let n = n.trim().to_owned();
            match n.chars().count() {
                _ if n.chars().any(char::is_control) => {
                    Err(FieldError::new("name", "invalid_characters", "control characters are not allowed"))
                }
                0 => Err(FieldError::new("name", "required", "name is required")),
                1..=100 => Ok(n),
                _ => Err(FieldError::new("name", "too_long", "use at most 100 characters")),
            }
        }));
        if let Some(e) = input.expires_in {
            if !(60..=10 * 365 * 86_400).contains(&e) {
                c.push(FieldError::new("expires_in", "out_of_range", "between 60 seconds and 10 years"));
            }
        }
        c.finish()?;
        let Some(name) = name else {
            return Err(Error::Validation(vec![]));
        };
        let now = self.now();
        let (key, prefix) = tokens::new_api_key();
        let record = ApiKey {
            id: Uuid::now_v7(),
            user_id: caller.user.id,
            name,
            prefix,
            created_at: now,
            expires_at: input.expires_in.map(|e| now + e),
            last_used_at: None,
        };
        if !self.store.create_api_key(&record, &tokens::hash_token(&key), MAX_KEYS_PER_USER).await? {
            return Err(Error::Validation(vec![FieldError::new(
                "name",
                "limit_reached",
                format!("at most {MAX_KEYS_PER_USER} keys per user"),
            )]));
        }
        self.audit(
            Some(&caller.user),
            None,
            "api_key_created",
            Some(meta),
            serde_json::json!({"api_key_id": record.id}),
        )
        .await;
        Ok((record, key))
    }

    /// The caller's keys (never the keys themselves).
    pub async fn api_keys(&self, caller: &Caller) -> Result<Vec<ApiKey>> {
        Ok(self.store.list_api_keys(caller.user.id).await?)
    }

    /// Revokes one of the caller's keys.
    pub async fn revoke_api_key(&self, caller: &Caller, id: Uuid, meta: &ClientMeta) -> Result<()> {
        if !self.store.revoke_api_key(caller.user.id, id, self.now()).await? {
            return Err(Error::NotFound);
        }
        self.audit(Some(&caller.user), None, "api_key_revoked", Some(meta), serde_json::json!({"api_key_id": id}))
            .await;
        Ok(())
    }

    /// Checks an `X-API-Key`.
    pub async fn authenticate_api_key(&self, key: &str) -> Result<Caller> {
        if key.is_empty() || key.len() > 256 {
            return Err(Error::Unauthorized);
        }
        let (_, user) =
            self.store.api_key_user(&tokens::hash_token(key), self.now()).await?.ok_or(Error::Unauthorized)?;
        if user.status != Status::Active {
            return Err(Error::Unauthorized);
        }
        Ok(Caller { user, session_id: None })
    }
}
