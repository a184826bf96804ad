//! The password policy for new passwords: 8 to 256 characters, not one of the most
//! common passwords, not the email address itself. Length is counted in characters,
//! so a passphrase in any script is as good as one in ASCII.

use super::FieldError;

/// Fewest characters a new password may have.
pub const MIN_CHARS: usize = 8;
/// Most characters a new password may have (argon2 takes any length; this bounds work).
pub const MAX_CHARS: usize = 256;
/// Most bytes a presented password may have on login; longer cannot be right.
pub const MAX_LOGIN_BYTES: usize = 4096;

const COMMON: &[&str] = &[
    "password",
    "password1",
    "password123",
    "12345678",
    "123456789",
    "1234567890",
    "qwertyuiop",
    "qwerty123",
    "iloveyou",
    "11111111",
    "00000000",
    "abc12345",
    "abcd1234",
    "letmein1",
    "welcome1",
    "admin123",
    "passw0rd",
    "football",
    "baseball",
    "sunshine",
    "princess",
    "trustno1",
    "1q2w3e4r",
    "q1w2e3r4",
    "superman",
    "starwars",
    "whatever",
    "computer",
    "michelle",
    "jennifer",
    "corvette",
    "mercedes",
    "internet",
    "changeme",
    "p@ssw0rd",
    "qwertyui",
    "asdfghjk",
    "zxcvbnm1",
    "87654321",
    "12341234",
    "11223344",
    "monkey123",
    "dragon123",
    "master123",
    "welcome123",
    "password!",
];

/// Checks a new password against the policy; `email` is the account's address.
pub fn check_new(password: &str, email: Option<&str>, field: &str) -> Result<(), FieldError> {
    let chars = password.chars().count();
    if chars < MIN_CHARS {
        return Err(FieldError::new(field, "too_short", format!("use at least {MIN_CHARS} characters")));
    }
    if chars > MAX_CHARS {
        return Err(FieldError::new(field, "too_long", format!("use at most {MAX_CHARS} characters")));
    }
    let lower = password.to_lowercase();
    if COMMON.contains(&lower.as_str()) || lower.chars().all(|c| lower.starts_with(c)) {
        return Err(FieldError::new(field, "too_common", "this password is too easy to guess"));
    }
    if email.is_some_and(|e| lower == e || e.split('@').next() == Some(lower.as_str())) {
        return Err(FieldError::new(field, "too_common", "the password must not be the email address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_long_and_common_passwords_are_refused() {
        assert_eq!(check_new("short", None, "password").unwrap_err().code, "too_short");
        assert_eq!(check_new(&"x".repeat(300), None, "password").unwrap_err().code, "too_long");
        assert_eq!(check_new("Password123", None, "password").unwrap_err().code, "too_common");
        assert_eq!(check_new("aaaaaaaaaa", None, "password").unwrap_err().code, "too_common");
    }

    #[test]
    fn the_email_is_not_a_password() {
        let e = check_new("alice.smith@example.com", Some("alice.smith@example.com"), "password");
        assert_eq!(e.unwrap_err().code, "too_common");
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        assert!(check_new("пароль-дл", None, "password").is_ok());
        assert!(check_new("correct horse battery staple", None, "password").is_ok());
    }
}
