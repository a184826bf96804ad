//! The texts of every mail. ASCII only, with links on lines of their own, so the
//! messages stay 7-bit and no client wraps a token.

use super::Mail;

/// Verification: a link with the token and the 6-digit code.
pub fn verification(to: &str, public_url: &str, token: &str, code: &str, link_hours: u32, code_minutes: u32) -> Mail {
    Mail {
        to: to.to_owned(),
        subject: "Verify your email address".into(),
        body: format!(
            "Welcome!\n\nConfirm your email address by opening this link (valid {link_hours} hours):\n\n\
             {public_url}/verify-email?token={token}\n\n\
             or enter this code (valid {code_minutes} minutes):\n\n    {code}\n\n\
             If you did not create an account, ignore this mail.\n"
        ),
    }
}

/// Someone tried to register an address that already has an account.
pub fn already_registered(to: &str, public_url: &str) -> Mail {
    Mail {
        to: to.to_owned(),
        subject: "Sign-up attempt with your email address".into(),
        body: format!(
            "Someone tried to create an account with this email address, which already has one.\n\n\
             If it was you, log in instead, or reset your password at\n\n{public_url}/forgot-password\n\n\
             If it was not you, you can ignore this mail: nothing was changed.\n"
        ),
    }
}

/// A password reset link.
pub fn password_reset(to: &str, public_url: &str, token: &str, minutes: u32) -> Mail {
    Mail {
        to: to.to_owned(),
        subject: "Reset your password".into(),
        body: format!(
            "To choose a new password, open this link (valid {minutes} minutes, usable once):\n\n\
             {public_url}/reset-password?token={token}\n\n\
             If you did not ask for this, ignore this mail: your password stays as it is.\n"
        ),
    }
}

/// The password was changed or reset.
pub fn password_changed(to: &str) -> Mail {
    Mail {
        to: to.to_owned(),
        subject: "Your password was changed".into(),
        body: "The password of your account was just changed and your other sessions were ended.\n\n\
               If this was not you, reset your password at once.\n"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_mail_holds_the_link_token_and_the_code() {
        let m = verification("a@example.com", "http://h", "abc123", "042917", 24, 15);
        assert!(m.body.contains("token=abc123\n"));
        assert!(m.body.contains("    042917\n"));
        assert!(m.body.is_ascii());
    }
}
