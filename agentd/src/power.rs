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

pub async fn run(conn: &Connection, action: PowerAction) -> Result<(), Error> {
    let m = ManagerProxy::new(conn)
        .await
        .map_err(|e| Error::Unavailable(format!("logind: {e}")))?;
    let r = match action {
        PowerAction::Reboot => m.reboot(false).await,
        PowerAction::PowerOff => m.power_off(false).await,
        PowerAction::Suspend => m.suspend(false).await,
    };
    r.map_err(|e| Error::Unavailable(format!("logind refused {action:?}: {e}")))
}
