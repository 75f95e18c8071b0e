//! Authorization: every method asks polkit, with the caller taken from the
//! message header. No polkit answer means no.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use leasehold_dbus_api::Error;
use zbus::message::Header;
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

/// Asks polkit about each call.
#[derive(Debug)]
pub struct Authorizer {
    conn: Connection,
    denials: RateLimit,
}

impl Authorizer {
    pub fn new(conn: Connection) -> Self {
        Self {
            conn,
            denials: RateLimit::new(20, Duration::from_secs(60)),
        }
    }

    /// Returns the caller's uid if authorized.
    /// Checks `action` for the sender of `hdr`, non-interactively, passing
    /// `details` so rules can be specific. `allow_root` false refuses uid 0
    /// whatever polkit says (root is the landlord's identity on the node).
    pub async fn check(
        &self,
        hdr: &Header<'_>,
        action: &str,
        details: &[(&str, &str)],
        allow_root: bool,
    ) -> Result<u32, Error> {
        let sender = hdr
            .sender()
            .ok_or_else(|| Error::NotAuthorized("message has no sender".into()))?
            .to_string();
        let dbus = zbus::fdo::DBusProxy::new(&self.conn)
            .await
            .map_err(|e| Error::Failed(format!("bus proxy: {e}")))?;
        let uid = dbus
            .get_connection_unix_user(
                zbus::names::BusName::try_from(sender.as_str())
                    .map_err(|e| Error::Failed(e.to_string()))?,
            )
            .await
            .map_err(|e| Error::NotAuthorized(format!("cannot identify the caller: {e}")))?;
        if uid == 0 && !allow_root {
            self.log_denial(uid, action, "root may not act as the tenant");
            return Err(Error::NotAuthorized(format!(
                "{action}: root acts as the landlord on this node; tenant methods must be called by a tenant user"
            )));
        }
        let subject = Subject::new_for_message_header(hdr)
            .map_err(|e| Error::NotAuthorized(format!("cannot build the polkit subject: {e}")))?;
        let details: HashMap<&str, &str> = details.iter().copied().collect();
        let result = async {
            let authority = AuthorityProxy::new(&self.conn).await?;
            authority
                .check_authorization(
                    &subject,
                    action,
                    &details,
                    CheckAuthorizationFlags::empty(),
                    "",
                )
                .await
        }
        .await;
        match result {
            Ok(r) if r.is_authorized => Ok(uid),
            Ok(_) => {
                self.log_denial(uid, action, "polkit denied");
                Err(Error::NotAuthorized(format!("not authorized for {action}")))
            }
            Err(e) => {
                self.log_denial(uid, action, "polkit unreachable");
                Err(Error::NotAuthorized(format!(
                    "{action}: polkit could not be asked ({e}); denied (fail closed)"
                )))
            }
        }
    }

    fn log_denial(&self, uid: u32, action: &str, why: &str) {
        if let Some(suppressed) = self.denials.allow() {
            tracing::warn!(uid, action, why, suppressed, "call denied");
        }
    }
}

/// Lets `burst` events through per `window`; reports how many were dropped
/// since the last one let through. Callers can trigger denials at will, so
/// their log lines are limited.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<(Instant, u32, u64)>,
}

impl RateLimit {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed_so_far)` if this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0.elapsed() > self.window {
            *s = (Instant::now(), 0, s.2);
        }
        if s.1 < self.burst {
            s.1 += 1;
            let suppressed = s.2;
            s.2 = 0;
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_suppressed() {
        let r = RateLimit::new(2, Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
    }
}
