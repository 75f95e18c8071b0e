//! Authorization: every method asks polkit, with the caller taken from the
//! message header. No polkit answer means no.
//!
//! Order of a check, cheapest first, so a caller who will be refused costs
//! the agent as little as possible:
//!
//! 1. the caller's uid and pid, from a per-unique-name cache or one
//!    `GetConnectionCredentials` round trip;
//! 2. root on the tenant interface is refused;
//! 3. callers in neither `leasehold-landlord` nor `leasehold-tenant` (and not
//!    root) are refused from a local group look-up (cached briefly), before
//!    polkit is asked; so are callers in both: the landlord and the tenant
//!    must be different people, and the shipped polkit rules would give such
//!    a user both roles (logged once per connection, rate-limited);
//! 4. a per-uid bound on calls in flight: beyond it the call gets
//!    `org.leasehold.Error.Busy` at once;
//! 5. polkit `CheckAuthorization` about the caller's process (pid, start
//!    time and the bus's uid: see [`subject_of`]).
//!
//! Steps 1, 3 and 5 share one deadline (`[dbus] auth_timeout_ms`, default
//! [`AUTH_TIMEOUT`]); past it the call is refused (fail closed). Outgoing
//! calls are also bounded in number ([`MAX_OUTGOING`]) so a burst of callers
//! cannot push the agent's connection past the bus's limit on pending
//! replies.
//!
//! The in-flight permit is held for the whole method call: [`Bounded`] wraps
//! each D-Bus interface and runs every method call in a task-local slot, and
//! [`Authorized::hold`] puts the permit there.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_dbus_api::Error;
use leasehold_tpm::Role;
use tokio::sync::Semaphore;
use tokio::time::timeout_at;
use zbus::message::Header;
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

/// Default bound on the authorization of one call (identity, groups, polkit).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls one uid may have in flight (authorized and not yet answered).
pub const MAX_IN_FLIGHT_PER_UID: usize = 16;
/// Outgoing authorization calls (bus, polkit, group look-ups) at once.
/// dbus-daemon refuses a connection more than `max_replies_per_connection`
/// pending calls (128 on the system bus) with `LimitsExceeded`.
pub const MAX_OUTGOING: usize = 64;
/// Unique bus names whose uid is remembered (oldest forgotten first).
const IDENTITY_CACHE: usize = 4096;
/// How long polkit's yes is reused by default (`[dbus] auth_reuse_ms`).
pub const AUTH_REUSE: Duration = Duration::from_secs(5);
/// Reused answers remembered (connection, action, details).
const GRANT_CACHE: usize = 4096;
/// How long a uid's group membership is trusted.
const GROUP_TTL: Duration = Duration::from_secs(10);
/// uids whose group membership is remembered.
const GROUP_CACHE: usize = 1024;
/// Group of the shipped polkit rules for the landlord.
pub const LANDLORD_GROUP: &str = "leasehold-landlord";
/// Group of the shipped polkit rules for the tenant.
pub const TENANT_GROUP: &str = "leasehold-tenant";

/// Asks polkit about each call.
pub struct Authorizer {
    conn: Connection,
    /// Built once, without property caching: a proxy that caches
    /// properties subscribes and reads them on the bus when it is made.
    bus: tokio::sync::OnceCell<zbus::fdo::DBusProxy<'static>>,
    polkit: tokio::sync::OnceCell<AuthorityProxy<'static>>,
    timeout: Duration,
    outgoing: Semaphore,
    identities: Mutex<Identities>,
    groups: Mutex<HashMap<u32, (Membership, Instant)>>,
    grants: Mutex<Grants>,
    in_flight: InFlightTable,
    denials: RateLimit,
    busy: RateLimit,
    /// Log lines for callers in both groups: once per connection, and
    /// rate-limited on their own so other denials cannot hide them.
    both_roles: RateLimit,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// An authorized call: the caller's uid and its in-flight permit.
#[derive(Debug)]
#[must_use = "the in-flight permit is released when this is dropped"]
pub struct Authorized {
    pub uid: u32,
    permit: InFlight,
}

impl Authorized {
    /// Keeps the permit until the current method call has been answered
    /// (the call runs inside [`Bounded`]) and returns the uid. Outside a
    /// [`Bounded`] call the permit could not be held: refused.
    pub fn hold(self) -> Result<u32, Error> {
        let uid = self.uid;
        let mut permit = Some(self.permit);
        let held = CALL_PERMIT
            .try_with(|slot| slot.borrow_mut().permit = permit.take())
            .is_ok();
        if held {
            Ok(uid)
        } else {
            Err(Error::Failed(
                "internal: method call not dispatched through the in-flight bound".into(),
            ))
        }
    }
}

/// Calls in flight per uid.
#[derive(Debug, Default, Clone)]
struct InFlightTable(Arc<Mutex<HashMap<u32, usize>>>);

impl InFlightTable {
    /// A permit for one more call of `uid`, unless it has `max` already.
    fn admit(&self, uid: u32, max: usize) -> Option<InFlight> {
        let mut m = lock(&self.0);
        let n = m.entry(uid).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(InFlight {
            uid,
            map: self.0.clone(),
        })
    }

    #[cfg(test)]
    fn count(&self, uid: u32) -> usize {
        lock(&self.0).get(&uid).copied().unwrap_or(0)
    }
}

/// One call in flight for `uid`; released on drop.
struct InFlight {
    uid: u32,
    map: Arc<Mutex<HashMap<u32, usize>>>,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InFlight(uid {})", self.uid)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who is behind a unique bus name, as the bus saw it when the connection
/// was made (the kernel's peer credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Caller {
    uid: u32,
    /// None when the bus does not know it.
    pid: Option<u32>,
    /// The start time of `pid` (clock ticks since boot, /proc/PID/stat)
    /// read when the connection was first identified: every later check
    /// names that process, not whichever holds the pid by then (polkitd
    /// compares it with the live one). None: not readable then.
    start: Option<u64>,
}

/// The caller per unique bus name. Unique names are never reused on a bus,
/// so an entry stays true for as long as it is kept. Each entry also
/// remembers whether the connection's refusal as a user in both groups was
/// logged.
#[derive(Default)]
struct Identities {
    uids: HashMap<String, (Caller, bool)>,
    order: VecDeque<String>,
}

impl Identities {
    fn get(&self, name: &str) -> Option<Caller> {
        self.uids.get(name).map(|(c, _)| *c)
    }

    fn insert(&mut self, name: String, caller: Caller) {
        if self.uids.contains_key(&name) {
            return;
        }
        while self.order.len() >= IDENTITY_CACHE {
            if let Some(old) = self.order.pop_front() {
                self.uids.remove(&old);
            }
        }
        self.order.push_back(name.clone());
        self.uids.insert(name, (caller, false));
    }

    /// Whether this is the first both-groups refusal of connection `name`
    /// (marks it). A name not kept (not unique, or forgotten) counts as
    /// first: a repeated line beats a lost one.
    fn first_both_refusal(&mut self, name: &str) -> bool {
        match self.uids.get_mut(name) {
            Some((_, logged)) => !std::mem::replace(logged, true),
            None => true,
        }
    }
}

/// One answer of polkit: this connection (unique name), this action, these
/// details.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GrantKey {
    sender: String,
    action: String,
    details: Vec<(String, String)>,
    /// The caller's groups when polkit said yes (root: none): a caller
    /// moved to the other group never reuses the old role's answer.
    member: (bool, bool),
}

impl GrantKey {
    fn new(sender: &str, action: &str, details: &[(&str, &str)], member: Membership) -> Self {
        let mut details: Vec<(String, String)> = details
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        details.sort();
        Self {
            sender: sender.to_owned(),
            action: action.to_owned(),
            details,
            member: (member.landlord, member.tenant),
        }
    }
}

/// polkit's recent yes answers, reused for [`AUTH_REUSE`] (configurable):
/// under a flood of the bus each polkit check costs tens of milliseconds
/// (docs/dbus.md), while a client on one connection repeats the same
/// checks. Only yes is kept, only for unique names (never reused on a
/// bus), never longer than the group cache that already bounds how long a
/// removed member keeps access; the group pre-check still runs every call.
///
/// polkit's policy can change under a kept answer (a rules file edited, an
/// action file installed, polkitd restarted): every answer is then
/// forgotten at once ([`Authorizer::forget_grants_on_policy_changes`]), and
/// an answer asked before the change but arriving after it is not kept
/// (`epoch`).
struct Grants {
    ttl: Duration,
    at: HashMap<GrantKey, Instant>,
    /// Bumped at every policy change.
    epoch: u64,
}

impl Grants {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            at: HashMap::new(),
            epoch: 0,
        }
    }

    /// Forgets every answer: the policy they came from changed.
    fn forget_all(&mut self) {
        self.at.clear();
        self.epoch += 1;
    }

    fn holds(&self, k: &GrantKey) -> bool {
        self.at.get(k).is_some_and(|t| t.elapsed() < self.ttl)
    }

    /// Keeps a yes asked for at `epoch` (none if the policy changed since).
    fn insert(&mut self, k: GrantKey, epoch: u64) {
        if self.ttl.is_zero() || epoch != self.epoch {
            return;
        }
        if self.at.len() >= GRANT_CACHE {
            let ttl = self.ttl;
            self.at.retain(|_, t| t.elapsed() < ttl);
            if self.at.len() >= GRANT_CACHE {
                self.at.clear();
            }
        }
        self.at.insert(k, Instant::now());
    }
}

/// Which of the two Leasehold groups a uid is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Membership {
    pub(crate) landlord: bool,
    pub(crate) tenant: bool,
}

/// Why a call was refused before polkit answered.
enum Stop {
    Denied(Error, &'static str),
    Late(&'static str),
}

impl Authorizer {
    /// `conn` is used for the outgoing calls (bus, polkit): best a
    /// connection of its own, so their replies do not queue behind incoming
    /// calls. `timeout` bounds the authorization of each call.
    pub fn new(conn: Connection, timeout: Duration, reuse: Duration) -> Self {
        Self {
            conn,
            bus: tokio::sync::OnceCell::new(),
            polkit: tokio::sync::OnceCell::new(),
            timeout,
            outgoing: Semaphore::new(MAX_OUTGOING),
            identities: Mutex::new(Identities::default()),
            groups: Mutex::new(HashMap::new()),
            grants: Mutex::new(Grants::new(reuse)),
            in_flight: InFlightTable::default(),
            denials: RateLimit::new(20, Duration::from_secs(60)),
            busy: RateLimit::new(20, Duration::from_secs(60)),
            both_roles: RateLimit::new(20, Duration::from_secs(60)),
        }
    }

    /// Forgets every kept polkit answer whenever polkit says its policy
    /// changed (`Changed`: rules or actions reloaded) or polkitd's name
    /// changes owner (a restart). Runs for the agent's life; returns only
    /// if it cannot subscribe, and then answers are no longer kept at all
    /// (fail closed: every call asks polkit).
    pub async fn forget_grants_on_policy_changes(&self) {
        use futures_util::StreamExt;
        let subscribed = async {
            let authority = AuthorityProxy::builder(&self.conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            let changed = authority.receive_changed().await?;
            let bus = zbus::fdo::DBusProxy::new(&self.conn).await?;
            let owner = bus
                .receive_name_owner_changed_with_args(&[(0, "org.freedesktop.PolicyKit1")])
                .await?;
            Ok::<_, zbus::Error>((changed, owner))
        }
        .await;
        let (mut changed, mut owner) = match subscribed {
            Ok(streams) => streams,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow polkit policy changes: polkit answers are not reused");
                let mut g = lock(&self.grants);
                g.forget_all();
                g.ttl = Duration::ZERO;
                return;
            }
        };
        // polkitd says Changed for every login session that starts or ends
        // (each `tenantctl --host` call is an SSH login): at most
        // `PER_MINUTE` lines a minute, the next one saying how many went
        // unlogged; a polkitd restart always.
        const PER_MINUTE: u32 = 10;
        let mut window = tokio::time::Instant::now();
        let (mut lines, mut unlogged) = (0u32, 0u64);
        loop {
            let why = tokio::select! {
                Some(_) = changed.next() => "polkit policy changed",
                Some(_) = owner.next() => "polkitd restarted",
                else => break,
            };
            lock(&self.grants).forget_all();
            if window.elapsed() >= Duration::from_secs(60) {
                window = tokio::time::Instant::now();
                lines = 0;
            }
            if why != "polkitd restarted" && lines >= PER_MINUTE {
                unlogged += 1;
                continue;
            }
            lines += 1;
            tracing::info!(unlogged, "{why}: kept polkit answers forgotten ({unlogged} changes unlogged before this one)");
            unlogged = 0;
        }
        // The bus connection is gone: the agent is stopping.
        lock(&self.grants).ttl = Duration::ZERO;
    }

    /// The role a caller of an interface both roles share (Attest1) acts
    /// as: root and members of the landlord group are the landlord, anyone
    /// else the tenant. Only picks the polkit action to ask about: `check`
    /// still refuses users in both groups or in neither.
    pub async fn role_of(&self, hdr: &Header<'_>) -> Result<Role, Error> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let sender = hdr
            .sender()
            .ok_or_else(|| Error::NotAuthorized("message has no sender".into()))?
            .to_string();
        let caller = match self.caller_of(&sender, deadline).await {
            Ok(c) => c,
            Err(stop) => return Err(self.stopped(None, "role lookup", stop)),
        };
        if caller.uid == 0 {
            return Ok(Role::Landlord);
        }
        match self.in_agent_groups(caller.uid, deadline).await {
            Ok(Membership {
                landlord: true,
                tenant: false,
            }) => Ok(Role::Landlord),
            Ok(_) => Ok(Role::Tenant),
            Err(stop) => Err(self.stopped(Some(caller.uid), "role lookup", stop)),
        }
    }

    /// Authorizes `action` for the sender of `hdr`, non-interactively,
    /// passing `details` so rules can be specific. `allow_root` false
    /// refuses uid 0 whatever polkit says (root is the landlord's identity
    /// on the node). The returned permit counts against the caller's
    /// in-flight bound until dropped.
    pub async fn check(
        &self,
        hdr: &Header<'_>,
        action: &str,
        details: &[(&str, &str)],
        allow_root: bool,
    ) -> Result<Authorized, Error> {
        let r = self.check_caller(hdr, action, details, allow_root).await;
        // The call's outcome for the metrics, when it runs inside Bounded.
        let outcome = match &r {
            Ok(_) => Outcome::Authorized,
            Err(Error::Busy(_)) => Outcome::Busy,
            Err(_) => Outcome::Denied,
        };
        let _ = CALL_PERMIT.try_with(|slot| slot.borrow_mut().outcome = Some(outcome));
        r
    }

    async fn check_caller(
        &self,
        hdr: &Header<'_>,
        action: &str,
        details: &[(&str, &str)],
        allow_root: bool,
    ) -> Result<Authorized, Error> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let sender = hdr
            .sender()
            .ok_or_else(|| Error::NotAuthorized("message has no sender".into()))?
            .to_string();
        let caller = match self.caller_of(&sender, deadline).await {
            Ok(c) => c,
            Err(stop) => return Err(self.stopped(None, action, stop)),
        };
        let uid = caller.uid;
        if uid == 0 && !allow_root {
            self.log_denial(uid, action, "root may not act as the tenant");
            return Err(Error::NotAuthorized(format!(
                "{action}: root acts as the landlord on this node; tenant methods must be called by a tenant user"
            )));
        }
        // Root is the landlord by identity, not by group (and is refused
        // the tenant interface above), so only other callers are checked.
        let mut member = Membership::default();
        if uid != 0 {
            match self.in_agent_groups(uid, deadline).await {
                Ok(Membership {
                    landlord: true,
                    tenant: true,
                }) => {
                    self.log_both_roles(&sender, uid, action);
                    return Err(Error::NotAuthorized(format!(
                        "not authorized for {action}: the caller (uid {uid}) is in both {LANDLORD_GROUP} and {TENANT_GROUP}; \
                         the landlord and the tenant must be different people, so every call of this user is refused \
                         until it is removed from one of the groups"
                    )));
                }
                Ok(Membership {
                    landlord: false,
                    tenant: false,
                }) => {
                    self.log_denial(uid, action, "in neither Leasehold group");
                    return Err(Error::NotAuthorized(format!(
                        "not authorized for {action}: the caller is in neither {LANDLORD_GROUP} nor {TENANT_GROUP}"
                    )));
                }
                Ok(m) => member = m,
                Err(stop) => return Err(self.stopped(Some(uid), action, stop)),
            }
        }
        let permit = self.admit(uid, action)?;
        let grant = GrantKey::new(&sender, action, details, member);
        let epoch = {
            let g = lock(&self.grants);
            if g.holds(&grant) {
                return Ok(Authorized { uid, permit });
            }
            g.epoch
        };
        let subject = subject_of(caller, hdr)?;
        let details: HashMap<&str, &str> = details.iter().copied().collect();
        let asked = timeout_at(deadline, async {
            let _slot = self.outgoing.acquire().await;
            let authority = self
                .polkit
                .get_or_try_init(|| {
                    AuthorityProxy::builder(&self.conn)
                        .cache_properties(zbus::proxy::CacheProperties::No)
                        .build()
                })
                .await?;
            authority
                .check_authorization(
                    &subject,
                    action,
                    &details,
                    CheckAuthorizationFlags::empty(),
                    "",
                )
                .await
        })
        .await;
        match asked {
            Ok(Ok(r)) if r.is_authorized => {
                if sender.starts_with(':') {
                    lock(&self.grants).insert(grant, epoch);
                }
                Ok(Authorized { uid, permit })
            }
            Ok(Ok(_)) => {
                self.log_denial(uid, action, "polkit denied");
                Err(Error::NotAuthorized(format!("not authorized for {action}")))
            }
            Ok(Err(e)) => {
                self.log_denial(uid, action, "polkit unreachable");
                Err(Error::NotAuthorized(format!(
                    "{action}: polkit could not be asked ({e}); denied (fail closed)"
                )))
            }
            Err(_) => Err(self.stopped(Some(uid), action, Stop::Late("polkit"))),
        }
    }

    /// Counts a call against `uid`'s in-flight bound.
    fn admit(&self, uid: u32, action: &str) -> Result<InFlight, Error> {
        self.in_flight
            .admit(uid, MAX_IN_FLIGHT_PER_UID)
            .ok_or_else(|| {
                if let Some(suppressed) = self.busy.allow() {
                    tracing::warn!(uid, action, suppressed, "call refused: too many in flight");
                }
                Error::Busy(format!(
                    "{action}: {MAX_IN_FLIGHT_PER_UID} calls of this user are already in flight; retry when one has been answered"
                ))
            })
    }

    fn stopped(&self, uid: Option<u32>, action: &str, stop: Stop) -> Error {
        let uid = uid.unwrap_or(u32::MAX);
        match stop {
            Stop::Denied(e, why) => {
                self.log_denial(uid, action, why);
                e
            }
            Stop::Late(what) => {
                if let Some(suppressed) = self.denials.allow() {
                    tracing::warn!(
                        uid,
                        action,
                        waited_for = what,
                        suppressed,
                        "call denied: authorization timed out"
                    );
                }
                Error::NotAuthorized(format!(
                    "{action}: {what} did not answer within {} ms; denied (fail closed)",
                    self.timeout.as_millis()
                ))
            }
        }
    }

    /// The caller behind a unique bus name: cached, or asked of the bus
    /// (one round trip for uid and pid).
    async fn caller_of(
        &self,
        sender: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Caller, Stop> {
        if let Some(c) = lock(&self.identities).get(sender) {
            return Ok(c);
        }
        let name = zbus::names::BusName::try_from(sender).map_err(|e| {
            Stop::Denied(
                Error::NotAuthorized(format!("invalid sender {sender:?}: {e}")),
                "invalid sender",
            )
        })?;
        let asked = timeout_at(deadline, async {
            let _slot = self.outgoing.acquire().await;
            let dbus = self
                .bus
                .get_or_try_init(|| {
                    zbus::fdo::DBusProxy::builder(&self.conn)
                        .cache_properties(zbus::proxy::CacheProperties::No)
                        .build()
                })
                .await?;
            dbus.get_connection_credentials(name).await
        })
        .await
        .map_err(|_| Stop::Late("the bus (GetConnectionCredentials)"))?;
        let unknown = |e: String| {
            Stop::Denied(
                Error::NotAuthorized(format!("cannot identify the caller: {e}")),
                "caller unknown",
            )
        };
        let creds = asked.map_err(|e| unknown(e.to_string()))?;
        let uid = creds
            .unix_user_id()
            .ok_or_else(|| unknown("the bus did not give its uid".into()))?;
        let pid = creds.process_id();
        let caller = Caller {
            uid,
            pid,
            start: pid.and_then(start_time_of),
        };
        // Only names that start with ':' are unique (and never reused).
        if sender.starts_with(':') {
            lock(&self.identities).insert(sender.to_owned(), caller);
        }
        Ok(caller)
    }

    /// Which of the two Leasehold groups `uid` is in (supplementary groups
    /// included, as polkit sees them), cached for [`GROUP_TTL`].
    async fn in_agent_groups(
        &self,
        uid: u32,
        deadline: tokio::time::Instant,
    ) -> Result<Membership, Stop> {
        if let Some((member, at)) = lock(&self.groups).get(&uid).copied() {
            if at.elapsed() < GROUP_TTL {
                return Ok(member);
            }
        }
        let looked_up = timeout_at(deadline, async {
            let _slot = self.outgoing.acquire().await;
            tokio::task::spawn_blocking(move || member_of_agent_groups(uid)).await
        })
        .await
        .map_err(|_| Stop::Late("the group database"))?;
        let member = match looked_up {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                return Err(Stop::Denied(
                    Error::NotAuthorized(format!(
                        "cannot read the groups of uid {uid} ({e}); denied (fail closed)"
                    )),
                    "group look-up failed",
                ))
            }
            Err(e) => {
                return Err(Stop::Denied(
                    Error::NotAuthorized(format!(
                        "group look-up for uid {uid} failed ({e}); denied (fail closed)"
                    )),
                    "group look-up failed",
                ))
            }
        };
        let mut g = lock(&self.groups);
        if g.len() >= GROUP_CACHE {
            g.retain(|_, (_, at)| at.elapsed() < GROUP_TTL);
            if g.len() >= GROUP_CACHE {
                g.clear();
            }
        }
        g.insert(uid, (member, Instant::now()));
        Ok(member)
    }

    fn log_denial(&self, uid: u32, action: &str, why: &str) {
        if let Some(suppressed) = self.denials.allow() {
            tracing::warn!(uid, action, why, suppressed, "call denied");
        }
    }

    /// Logs a caller in both groups: a misconfiguration for the
    /// administrator to fix, so said once per connection (a client retrying
    /// on one connection adds nothing), and rate-limited across connections.
    fn log_both_roles(&self, sender: &str, uid: u32, action: &str) {
        if !lock(&self.identities).first_both_refusal(sender) {
            return;
        }
        if let Some(suppressed) = self.both_roles.allow() {
            tracing::warn!(
                uid,
                sender,
                action,
                suppressed,
                "call denied: the caller is in both {LANDLORD_GROUP} and {TENANT_GROUP}; \
                 the landlord and the tenant must be different people (remove the user from one group); \
                 every call of this user is refused, logged once per connection"
            );
        }
    }
}

/// The polkit subject for a caller: its process (pid, start time, and the
/// uid the bus saw), so polkitd need not ask the bus who it is. Under a
/// flood of other callers the bus is the slow part: a bus-name subject
/// costs polkitd several round trips through it (docs/dbus.md).
///
/// The uid is the bus's (the kernel's peer credentials), never read from
/// /proc, so the user and groups polkit decides by are exact. The pid only
/// names the process: it must still be owned by that uid here, and polkitd
/// refuses a subject whose start time no longer matches (the pid reused
/// after this point). Otherwise, and without a pid, polkit is asked about
/// the bus name as before.
fn subject_of(caller: Caller, hdr: &Header<'_>) -> Result<Subject, Error> {
    // The start time read when the connection was identified (never the
    // pid's current one: that would be whichever process holds it now).
    if let (Some(pid), Some(start)) = (caller.pid, caller.start) {
        if real_uid_of(pid) == Some(caller.uid) && start_time_of(pid) == Some(start) {
            if let Ok(s) = Subject::new_for_pid(pid, Some(start), Some(caller.uid)) {
                return Ok(s);
            }
        }
    }
    Subject::new_for_message_header(hdr)
        .map_err(|e| Error::NotAuthorized(format!("cannot build the polkit subject: {e}")))
}

/// The start time of process `pid` (field 22 of /proc/PID/stat, clock
/// ticks since boot), counted from the last `)` (the name may hold any).
/// What names one process with its pid (the shim's records use it too).
fn start_time_of(pid: u32) -> Option<u64> {
    leasehold_engines::launch::start_time(pid)
}

/// The real uid of process `pid` (`Uid:` of /proc/PID/status), if it exists.
fn real_uid_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Group membership from the group database (NSS), like polkit's
/// `subject.isInGroup`. A uid without a passwd entry is in no group.
pub(crate) fn member_of_agent_groups(uid: u32) -> Result<Membership, nix::Error> {
    use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
    let Some(user) = User::from_uid(Uid::from_raw(uid))? else {
        return Ok(Membership::default());
    };
    let gid_of = |g: &str| Group::from_name(g).ok().flatten().map(|g| g.gid);
    let (landlord, tenant) = (gid_of(LANDLORD_GROUP), gid_of(TENANT_GROUP));
    if landlord.is_none() && tenant.is_none() {
        return Ok(Membership::default());
    }
    let name = CString::new(user.name).map_err(|_| nix::Error::EINVAL)?;
    // getgrouplist includes the primary group.
    let groups: Vec<Gid> = getgrouplist(&name, user.gid)?;
    let has = |g: Option<Gid>| g.is_some_and(|g| groups.contains(&g));
    Ok(Membership {
        landlord: has(landlord),
        tenant: has(tenant),
    })
}

tokio::task_local! {
    /// The in-flight permit and the authorization outcome of the method
    /// call running in this task.
    static CALL_PERMIT: RefCell<CallSlot>;
}

/// What the shared path learns about one method call.
#[derive(Debug, Default)]
struct CallSlot {
    permit: Option<InFlight>,
    outcome: Option<Outcome>,
}

/// How a call's authorization ended (the `outcome` label of
/// `leasehold_dbus_calls_total`). The handler's own result is not seen
/// here: zbus sends the reply inside the generated dispatch code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Authorized; the method ran.
    Authorized,
    /// Refused: polkit, groups, root on the tenant interface, or no answer
    /// in time (fail closed).
    Denied,
    /// Refused: too many calls of this user in flight.
    Busy,
    /// Answered without asking for authorization (a bug, or a method that
    /// needs none).
    Unchecked,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Authorized => "authorized",
            Outcome::Denied => "denied",
            Outcome::Busy => "busy",
            Outcome::Unchecked => "unchecked",
        }
    }
}

/// A D-Bus interface whose method calls each run with a slot for their
/// in-flight permit ([`Authorized::hold`]): the permit is released once the
/// reply has been sent, whatever the handler returns. Every call is counted
/// and timed in the metrics, here rather than in each method.
pub struct Bounded<I>(pub I, pub Arc<crate::metrics::DbusMetrics>);

#[zbus::export::async_trait::async_trait]
impl<I: zbus::object_server::Interface> zbus::object_server::Interface for Bounded<I> {
    fn name() -> zbus::names::InterfaceName<'static> {
        I::name()
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        self.0.spawn_tasks_for_methods()
    }

    async fn get(
        &self,
        property_name: &str,
        server: &zbus::ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &zbus::object_server::SignalEmitter<'_>,
    ) -> Option<Result<zbus::OwnedVariant, zbus::BoxDBusError>> {
        self.0
            .get(property_name, server, connection, header, emitter)
            .await
    }

    async fn get_all(
        &self,
        server: &zbus::ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &zbus::object_server::SignalEmitter<'_>,
    ) -> zbus::fdo::Result<HashMap<String, zbus::OwnedVariant>> {
        self.0.get_all(server, connection, header, emitter).await
    }

    fn set<'call>(
        &'call self,
        property_name: &'call str,
        value: &'call zbus::Variant<'_>,
        server: &'call zbus::ObjectServer,
        connection: &'call Connection,
        header: Option<&'call Header<'_>>,
        emitter: &'call zbus::object_server::SignalEmitter<'_>,
    ) -> zbus::object_server::DispatchResult<'call> {
        self.0
            .set(property_name, value, server, connection, header, emitter)
    }

    async fn set_mut(
        &mut self,
        property_name: &str,
        value: &zbus::Variant<'_>,
        server: &zbus::ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &zbus::object_server::SignalEmitter<'_>,
    ) -> Option<Result<(), zbus::BoxDBusError>> {
        self.0
            .set_mut(property_name, value, server, connection, header, emitter)
            .await
    }

    fn call<'call>(
        &'call self,
        server: &'call zbus::ObjectServer,
        connection: &'call Connection,
        msg: &'call zbus::Message,
        name: zbus::names::MemberName<'call>,
    ) -> zbus::object_server::DispatchResult<'call> {
        let method = name.to_string();
        with_permit_slot(
            self.0.call(server, connection, msg, name),
            self.1.clone(),
            I::name(),
            method,
        )
    }

    fn call_mut<'call>(
        &'call mut self,
        server: &'call zbus::ObjectServer,
        connection: &'call Connection,
        msg: &'call zbus::Message,
        name: zbus::names::MemberName<'call>,
    ) -> zbus::object_server::DispatchResult<'call> {
        let method = name.to_string();
        let metrics = self.1.clone();
        with_permit_slot(
            self.0.call_mut(server, connection, msg, name),
            metrics,
            I::name(),
            method,
        )
    }

    fn introspect_to_writer(&self, writer: &mut dyn std::fmt::Write, level: usize) {
        self.0.introspect_to_writer(writer, level)
    }
}

fn with_permit_slot<'a>(
    r: zbus::object_server::DispatchResult<'a>,
    metrics: Arc<crate::metrics::DbusMetrics>,
    interface: zbus::names::InterfaceName<'static>,
    method: String,
) -> zbus::object_server::DispatchResult<'a> {
    match r {
        zbus::object_server::DispatchResult::Async(f) => {
            let started = Instant::now();
            zbus::object_server::DispatchResult::Async(Box::pin(CALL_PERMIT.scope(
                RefCell::new(CallSlot::default()),
                async move {
                    let r = f.await;
                    // The reply has been sent: the latency callers saw.
                    let outcome = CALL_PERMIT
                        .with(|slot| slot.borrow().outcome)
                        .unwrap_or(Outcome::Unchecked);
                    metrics.observe(&interface, &method, outcome, started.elapsed());
                    r
                },
            )))
        }
        other => other,
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
        let mut s = lock(&self.state);
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

    fn who(uid: u32) -> Caller {
        Caller {
            uid,
            pid: Some(4242),
            start: None,
        }
    }

    #[test]
    fn a_process_start_time_is_read_past_any_name() {
        let me = start_time_of(std::process::id()).expect("own start time");
        assert_eq!(start_time_of(std::process::id()), Some(me));
        // Parsing past any name: leasehold_engines::launch's tests.
        assert_eq!(start_time_of(u32::MAX), None);
    }

    #[test]
    fn identity_cache_is_bounded_oldest_first() {
        let mut c = Identities::default();
        for i in 0..IDENTITY_CACHE + 10 {
            c.insert(format!(":1.{i}"), who(1000));
        }
        assert_eq!(c.uids.len(), IDENTITY_CACHE);
        assert_eq!(c.order.len(), IDENTITY_CACHE);
        assert_eq!(c.get(":1.0"), None);
        assert_eq!(
            c.get(&format!(":1.{}", IDENTITY_CACHE + 9)),
            Some(who(1000))
        );
    }

    #[test]
    fn in_flight_bound_and_release() {
        let t = InFlightTable::default();
        let permits: Vec<InFlight> = (0..3).map(|_| t.admit(7, 3).unwrap()).collect();
        assert!(t.admit(7, 3).is_none(), "fourth call of uid 7 refused");
        assert!(t.admit(8, 3).is_some(), "other uids are not affected");
        assert_eq!(t.count(7), 3);
        drop(permits);
        assert_eq!(t.count(7), 0);
        assert!(lock(&t.0).is_empty(), "released permits leave no entry");
    }

    #[tokio::test]
    async fn held_permit_lives_until_the_call_ends() {
        let t = InFlightTable::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        let call = {
            let t = t.clone();
            CALL_PERMIT.scope(RefCell::new(CallSlot::default()), async move {
                let a = Authorized {
                    uid: 5,
                    permit: t.admit(5, 8).unwrap(),
                };
                assert!(matches!(a.hold(), Ok(5)));
                held_tx.send(()).unwrap();
                // The handler goes on working with the permit held.
                rx.await.unwrap();
            })
        };
        let task = tokio::spawn(call);
        held_rx.await.unwrap();
        assert_eq!(t.count(5), 1, "held while the call runs");
        tx.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(t.count(5), 0, "released when the call ends");
        // Outside a bounded call a permit cannot be held: refused.
        let a = Authorized {
            uid: 5,
            permit: t.admit(5, 8).unwrap(),
        };
        assert!(matches!(a.hold(), Err(Error::Failed(_))));
        assert_eq!(t.count(5), 0);
    }

    #[test]
    fn root_is_in_no_leasehold_group_by_default_lookup_works() {
        // uid 0 exists everywhere; the look-up itself must not fail.
        assert!(member_of_agent_groups(0).is_ok());
        // A uid with no passwd entry is in no group.
        assert_eq!(
            member_of_agent_groups(4_000_000_000),
            Ok(Membership::default())
        );
    }

    const TENANT_ONLY: Membership = Membership {
        landlord: false,
        tenant: true,
    };

    #[test]
    fn grants_are_per_connection_action_and_details_and_expire() {
        let mut g = Grants::new(Duration::from_millis(200));
        let k = GrantKey::new(
            ":1.5",
            "org.leasehold.tenant.secret",
            &[("secret", "db"), ("method", "Put")],
            TENANT_ONLY,
        );
        assert!(!g.holds(&k));
        g.insert(k.clone(), 0);
        assert!(g.holds(&k));
        // The details' order does not matter; their values do.
        assert!(g.holds(&GrantKey::new(
            ":1.5",
            "org.leasehold.tenant.secret",
            &[("method", "Put"), ("secret", "db")],
            TENANT_ONLY
        )));
        assert!(!g.holds(&GrantKey::new(
            ":1.5",
            "org.leasehold.tenant.secret",
            &[("secret", "other"), ("method", "Put")],
            TENANT_ONLY
        )));
        assert!(!g.holds(&GrantKey::new(
            ":1.6",
            "org.leasehold.tenant.secret",
            &[("secret", "db"), ("method", "Put")],
            TENANT_ONLY
        )));
        assert!(!g.holds(&GrantKey::new(
            ":1.5",
            "org.leasehold.tenant.read",
            &[("secret", "db"), ("method", "Put")],
            TENANT_ONLY
        )));
        // The same caller moved to the other group: not its answer.
        assert!(!g.holds(&GrantKey::new(
            ":1.5",
            "org.leasehold.tenant.secret",
            &[("secret", "db"), ("method", "Put")],
            Membership {
                landlord: true,
                tenant: false,
            },
        )));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!g.holds(&k), "expired");
        // Bounded.
        for i in 0..GRANT_CACHE + 5 {
            g.insert(GrantKey::new(&format!(":1.{i}"), "a", &[], TENANT_ONLY), 0);
        }
        assert!(g.at.len() <= GRANT_CACHE);
        // 0 turns reuse off.
        let mut off = Grants::new(Duration::ZERO);
        off.insert(k.clone(), 0);
        assert!(!off.holds(&k));
    }

    #[test]
    fn a_policy_change_forgets_answers_and_refuses_late_ones() {
        let mut g = Grants::new(Duration::from_secs(10));
        let k = GrantKey::new(":1.5", "org.leasehold.landlord.read", &[], TENANT_ONLY);
        let asked_at = g.epoch;
        g.insert(k.clone(), asked_at);
        assert!(g.holds(&k));
        g.forget_all();
        assert!(!g.holds(&k), "forgotten at the change");
        // An answer asked before the change, arriving after it.
        g.insert(k.clone(), asked_at);
        assert!(!g.holds(&k), "asked under the old policy: not kept");
        g.insert(k.clone(), g.epoch);
        assert!(g.holds(&k));
    }

    #[test]
    fn a_pid_subject_only_for_a_process_of_the_bus_uid() {
        let me = std::process::id();
        assert_eq!(real_uid_of(me), Some(nix::unistd::getuid().as_raw()));
        assert_eq!(real_uid_of(u32::MAX), None);
    }

    #[test]
    fn both_groups_refusal_is_logged_once_per_connection() {
        let mut c = Identities::default();
        c.insert(":1.7".into(), who(1000));
        assert!(c.first_both_refusal(":1.7"));
        assert!(!c.first_both_refusal(":1.7"), "same connection: not again");
        c.insert(":1.8".into(), who(1000));
        assert!(c.first_both_refusal(":1.8"), "a new connection: once more");
        assert!(c.first_both_refusal("org.example.NotKept"));
        assert_eq!(c.get(":1.7"), Some(who(1000)));
    }
}
