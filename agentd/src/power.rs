//! Power actions through logind (org.freedesktop.login1.Manager), on the
//! same bus the agent serves.

use leasehold_dbus_api::Error;
use zbus::Connection;

#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Manager {
    fn reboot(&self, interactive: bool) -> zbus::Result<()>;
    fn power_off(&self, interactive: bool) -> zbus::Result<()>;
    fn suspend(&self, interactive: bool) -> zbus::Result<()>;
}

/// A power action.
#[derive(Debug, Clone, Copy)]
pub enum PowerAction {
    Reboot,
    PowerOff,
    Suspend,
}

/// How long logind may take to accept a power action: a frozen logind
/// must not hold the landlord's call (and its in-flight slot) forever.
pub const LOGIND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(conn: &Connection, action: PowerAction) -> Result<(), Error> {
    let call = async {
        let m = ManagerProxy::new(conn)
            .await
            .map_err(|e| Error::Unavailable(format!("logind: {e}")))?;
        let r = match action {
            PowerAction::Reboot => m.reboot(false).await,
            PowerAction::PowerOff => m.power_off(false).await,
            PowerAction::Suspend => m.suspend(false).await,
        };
        r.map_err(|e| Error::Unavailable(format!("logind refused {action:?}: {e}")))
    };
    tokio::time::timeout(LOGIND_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "logind did not answer {action:?} within {} s",
                LOGIND_TIMEOUT.as_secs()
            )))
        })
}
