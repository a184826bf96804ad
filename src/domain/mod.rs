//! Pure types and rules, no I/O: emails, the password policy, users, lockout.

pub mod email;
pub mod lockout;
pub mod password;
pub mod user;

/// One problem with one field of a request, as `validation_failed` lists them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's name in the request body.
    pub field: String,
    /// Stable machine-readable code: `required`, `invalid_type`, `invalid_email`, ...
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: &str, code: &str, message: impl Into<String>) -> Self {
        Self { field: field.into(), code: code.into(), message: message.into() }
    }
}
