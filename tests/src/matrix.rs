//! The authorization matrix: every method of both interfaces x {root,
//! landlord, tenant, outsider}, with the CLI call that exercises it. Used by
//! the host tests (private bus) and the VM lab tests (real system bus).

use Expect::{Allow, BusDenied, Deny};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allow,
    /// The agent refuses: `org.leasehold.Error.NotAuthorized` (CLI exit 3,
    /// "not authorized").
    Deny,
    /// The bus refuses before the agent sees the call (the shipped policy
    /// lets only root and the two Leasehold groups send to the agent):
    /// `org.freedesktop.DBus.Error.AccessDenied` (CLI exit 69).
    BusDenied,
}

/// Marker the CLI's stderr carries for [`Expect::BusDenied`].
pub const BUS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

impl Expect {
    /// Whether a CLI run (exit code, stderr) matches.
    pub fn matches(self, allowed_code: i32, code: i32, stderr: &str) -> bool {
        match self {
            Allow => code == allowed_code,
            Deny => code == 3 && stderr.contains("not authorized"),
            BusDenied => code == 69 && stderr.contains(BUS_DENIED),
        }
    }
}

/// Columns: root, landlord, tenant, outsider. Root is the landlord's identity
/// on the node (polkit authorizes uid 0), and agentd refuses it the tenant
/// interface: the landlord never acts as the tenant. Outsiders (in neither
/// Leasehold group) never reach the agent.
pub const LANDLORD: [Expect; 4] = [Allow, Allow, Deny, BusDenied];
pub const TENANT: [Expect; 4] = [Deny, Deny, Allow, BusDenied];

/// A user in both Leasehold groups (`Who::Both`), for every row of
/// [`MATRIX`]: the bus lets the call through (either group may send) and
/// the agent refuses it before polkit is asked, because the landlord and
/// the tenant must be different people. Not a column of the arrays above:
/// the VM lab has no such guest user.
pub const BOTH_GROUPS: Expect = Deny;
/// What the agent's refusal of a user in both groups says.
pub const BOTH_GROUPS_REASON: &str = "the landlord and the tenant must be different people";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    None,
    Assigned,
    SecretExists,
    /// A cluster boundary ([`BOUNDARY_DOC`]) is set (made again before each
    /// call on the host; in the VM before a case's first call and after an
    /// allowed one).
    Boundary,
    /// Assigned and a cluster boundary set.
    AssignedBoundary,
}

/// Cluster boundary of the matrix: allows everything, so it cannot cut the
/// lab's own connections (the VM lab runs the matrix over SSH).
pub const BOUNDARY_DOC: &str = "[groups]\nall = [\"0.0.0.0/0\", \"::/0\", \"10.9.9.9\"]\n[[allow]]\nname = \"all\"\npeers = [\"@all\"]\n";
/// Failsafe document of the matrix.
pub const FAILSAFE_DOC: &str = "[[failsafe]]\nname = \"ssh\"\npeers = [\"0.0.0.0/0\", \"::/0\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [22] }]\n";
/// Sub-boundary of the matrix (inside [`BOUNDARY_DOC`]).
pub const SUB_DOC: &str = "[[allow]]\nname = \"all\"\npeers = [\"0.0.0.0/0\", \"::/0\"]\n";

pub struct Case {
    pub interface: &'static str,
    pub method: &'static str,
    pub expect: [Expect; 4],
    pub program: &'static str,
    pub args: &'static [&'static str],
    pub setup: Setup,
    pub power: Option<&'static str>,
    /// Exit status of an allowed call (0; 4 where the call stops at its
    /// confirmation, which comes after authorization).
    pub allowed_code: i32,
}

const fn case(
    interface: &'static str,
    method: &'static str,
    expect: [Expect; 4],
    program: &'static str,
    args: &'static [&'static str],
    setup: Setup,
) -> Case {
    Case {
        interface,
        method,
        expect,
        program,
        args,
        setup,
        power: None,
        allowed_code: 0,
    }
}

const L: &str = "org.leasehold.Landlord1";
const T: &str = "org.leasehold.Tenant1";
const E: &str = "org.leasehold.TenantEngines1";
const H: &str = "org.leasehold.Health1";
const A: &str = "org.leasehold.Attest1";

/// Attest1 serves both roles (the caller's role picks the polkit action);
/// outsiders never reach the agent.
pub const BOTH_ROLES: [Expect; 4] = [Allow, Allow, Allow, BusDenied];

/// Engine spec of the matrix (`@SPEC`): invalid on purpose (no command),
/// so an authorized Deploy is refused right after authorization with
/// `InvalidArgument` (exit 6) whether or not the node has a volume and
/// cgroup v2 (the host lab has neither, the VM lab both).
pub const SPEC_DOC: &str = "command = []\n";

/// An engine call as the tenant. No engine exists in the labs, so an
/// authorized call stops right after authorization with `allowed_code`
/// (5 NotFound: no such engine; 6 for Deploy, above; 0 for List).
const fn engine_case(
    method: &'static str,
    args: &'static [&'static str],
    allowed_code: i32,
) -> Case {
    Case {
        allowed_code,
        ..case(E, method, TENANT, "tenantctl", args, Setup::Assigned)
    }
}

/// The full authorization matrix: every method of both interfaces.
/// `@PEM`, `@SECRET`, `@SPEC`, `@EMPTY` (an empty file) … are replaced
/// with files the test writes.
pub const MATRIX: &[Case] = &[
    case(
        L,
        "NodeInfo",
        LANDLORD,
        "landlordctl",
        &["info"],
        Setup::None,
    ),
    case(
        L,
        "GetPublicKey",
        LANDLORD,
        "landlordctl",
        &["pubkey", "landlord"],
        Setup::None,
    ),
    case(
        L,
        "AssignTenant",
        LANDLORD,
        "landlordctl",
        &["--yes", "assign", "acme"],
        Setup::None,
    ),
    case(
        L,
        "ReleaseTenant",
        LANDLORD,
        "landlordctl",
        &["--yes", "release"],
        Setup::Assigned,
    ),
    case(
        L,
        "RotateKeys",
        LANDLORD,
        "landlordctl",
        &["--yes", "rotate"],
        Setup::None,
    ),
    case(
        L,
        "RekeyKeys",
        LANDLORD,
        "landlordctl",
        &["rekey"],
        Setup::None,
    ),
    case(
        L,
        "RegisterConsoleKey",
        LANDLORD,
        "landlordctl",
        &["register-console", "ops", "@PEM"],
        Setup::None,
    ),
    Case {
        power: Some("reboot"),
        ..case(
            L,
            "Reboot",
            LANDLORD,
            "landlordctl",
            &["reboot"],
            Setup::None,
        )
    },
    Case {
        power: Some("poweroff"),
        ..case(
            L,
            "PowerOff",
            LANDLORD,
            "landlordctl",
            &["poweroff"],
            Setup::None,
        )
    },
    Case {
        power: Some("suspend"),
        ..case(
            L,
            "Suspend",
            LANDLORD,
            "landlordctl",
            &["suspend"],
            Setup::None,
        )
    },
    case(
        L,
        "SetBoundary",
        LANDLORD,
        "landlordctl",
        &["boundary", "set", "@BOUNDARY"],
        Setup::None,
    ),
    case(
        L,
        "GetBoundary",
        LANDLORD,
        "landlordctl",
        &["boundary", "show"],
        Setup::None,
    ),
    case(
        L,
        "SetBoundaryWithRevert",
        LANDLORD,
        "landlordctl",
        // --yes: the confirmed method, no revert deadline (the revert is
        // tested in tests/tests/boundary_netns.rs).
        &["--yes", "boundary", "set", "@BOUNDARY"],
        Setup::None,
    ),
    Case {
        // Nothing pending in the matrix: "no such object" after authorization.
        allowed_code: 5,
        ..case(
            L,
            "ConfirmBoundary",
            LANDLORD,
            "landlordctl",
            &["boundary", "confirm"],
            Setup::None,
        )
    },
    case(
        L,
        "CheckBoundary",
        LANDLORD,
        "landlordctl",
        &["boundary", "check", "@BOUNDARY"],
        Setup::None,
    ),
    case(
        L,
        "SetFailsafeConfirmed",
        LANDLORD,
        "landlordctl",
        &["--yes", "boundary", "failsafe", "@FAILSAFE"],
        Setup::Boundary,
    ),
    case(
        L,
        "AddPeers",
        LANDLORD,
        "landlordctl",
        &["boundary", "add-peer", "@all", "10.9.9.10"],
        Setup::Boundary,
    ),
    case(
        L,
        "RemovePeers",
        LANDLORD,
        "landlordctl",
        &["boundary", "remove-peer", "@all", "10.9.9.9"],
        Setup::Boundary,
    ),
    case(
        L,
        "SetFailsafe",
        LANDLORD,
        "landlordctl",
        &["boundary", "failsafe", "@FAILSAFE"],
        Setup::Boundary,
    ),
    case(
        L,
        "ExplainFlow",
        LANDLORD,
        "landlordctl",
        &["boundary", "explain", "--peer", "10.0.0.1", "--port", "22"],
        Setup::None,
    ),
    case(
        L,
        "RemoveBoundary",
        LANDLORD,
        "landlordctl",
        &["--yes", "boundary", "remove"],
        Setup::Boundary,
    ),
    Case {
        // A device that does not exist: after authorization the agent's
        // checks refuse it (InvalidArgument, exit 6) before any
        // confirmation is asked (the labs have no spare device to erase).
        allowed_code: 6,
        ..case(
            L,
            "InitVolume",
            LANDLORD,
            "landlordctl",
            &["volume", "init", "/dev/leasehold-none"],
            Setup::None,
        )
    },
    // No volume in the labs when the matrix runs: nothing to forget (0).
    case(
        L,
        "ForgetVolume",
        LANDLORD,
        "landlordctl",
        &["volume", "forget"],
        Setup::None,
    ),
    case(
        L,
        "VolumeStatus",
        LANDLORD,
        "landlordctl",
        &["volume", "status"],
        Setup::None,
    ),
    case(
        L,
        "GetReceiptKey",
        LANDLORD,
        "landlordctl",
        &["receipt-key"],
        Setup::None,
    ),
    case(
        T,
        "VolumeStatus",
        TENANT,
        "tenantctl",
        &["volume", "status"],
        Setup::Assigned,
    ),
    case(
        T,
        "GetReceiptKey",
        TENANT,
        "tenantctl",
        &["receipt-key"],
        Setup::None,
    ),
    case(
        L,
        "ListReceipts",
        LANDLORD,
        "landlordctl",
        &["receipts", "list"],
        Setup::None,
    ),
    // No receipt has this id: an authorized call ends in NotFound (5).
    // `budget clear` sets the empty budget: harmless wherever the matrix
    // runs (the VM lab's later engine tests included).
    case(
        L,
        "SetBudget",
        LANDLORD,
        "landlordctl",
        &["budget", "clear"],
        Setup::None,
    ),
    case(
        L,
        "GetBudget",
        LANDLORD,
        "landlordctl",
        &["budget", "show"],
        Setup::None,
    ),
    Case {
        allowed_code: 5,
        ..case(
            L,
            "GetReceipt",
            LANDLORD,
            "landlordctl",
            &["receipts", "show", "no-such-receipt"],
            Setup::None,
        )
    },
    case(
        T,
        "ListReceipts",
        TENANT,
        "tenantctl",
        &["receipts", "list"],
        Setup::None,
    ),
    Case {
        allowed_code: 5,
        ..case(
            T,
            "GetReceipt",
            TENANT,
            "tenantctl",
            &["receipts", "show", "no-such-receipt"],
            Setup::None,
        )
    },
    case(
        T,
        "NodeInfo",
        TENANT,
        "tenantctl",
        &["info"],
        Setup::Assigned,
    ),
    case(
        T,
        "GetPublicKey",
        TENANT,
        "tenantctl",
        &["pubkey"],
        Setup::Assigned,
    ),
    case(
        T,
        "RotateKeys",
        TENANT,
        "tenantctl",
        &["--yes", "rotate"],
        Setup::Assigned,
    ),
    case(
        T,
        "RekeyKeys",
        TENANT,
        "tenantctl",
        &["rekey"],
        Setup::Assigned,
    ),
    case(
        T,
        "RegisterConsoleKey",
        TENANT,
        "tenantctl",
        &["register-console", "laptop", "@PEM"],
        Setup::Assigned,
    ),
    case(
        T,
        "PutSecret",
        TENANT,
        "tenantctl",
        &["secret", "put", "db", "--from", "@SECRET"],
        Setup::Assigned,
    ),
    case(
        T,
        "ListSecrets",
        TENANT,
        "tenantctl",
        &["secret", "list"],
        Setup::Assigned,
    ),
    case(
        T,
        "RemoveSecret",
        TENANT,
        "tenantctl",
        &["secret", "rm", "db"],
        Setup::SecretExists,
    ),
    case(
        T,
        "SetSubBoundary",
        TENANT,
        "tenantctl",
        &["boundary", "set", "@SUB"],
        Setup::AssignedBoundary,
    ),
    case(
        T,
        "GetBoundary",
        TENANT,
        "tenantctl",
        &["boundary", "show"],
        Setup::Assigned,
    ),
    case(
        T,
        "ExplainFlow",
        TENANT,
        "tenantctl",
        &[
            "boundary", "explain", "--peer", "fd00::1", "--proto", "udp", "--port", "53",
        ],
        Setup::Assigned,
    ),
    case(
        T,
        "CheckSubBoundary",
        TENANT,
        "tenantctl",
        &["boundary", "check", "@SUB"],
        Setup::AssignedBoundary,
    ),
    case(
        T,
        "RemoveSubBoundary",
        TENANT,
        "tenantctl",
        &["boundary", "clear"],
        Setup::AssignedBoundary,
    ),
    engine_case(
        "Deploy",
        &["engine", "deploy", "web", "app.tar", "--spec", "@SPEC"],
        6,
    ),
    engine_case("Start", &["engine", "start", "web"], 5),
    engine_case("Stop", &["engine", "stop", "web"], 5),
    engine_case("Restart", &["engine", "restart", "web"], 5),
    engine_case("Reload", &["engine", "reload", "web"], 5),
    engine_case("Remove", &["--yes", "engine", "rm", "web"], 5),
    engine_case("List", &["engine", "ls"], 0),
    engine_case("Status", &["engine", "status", "web"], 5),
    engine_case("Logs", &["engine", "logs", "web"], 5),
    engine_case("Events", &["engine", "events"], 0),
    // Tenant only: the records are the tenant's proof; the landlord has
    // the journal (docs/health.md "Corrective actions").
    engine_case("ListActionRecords", &["actions", "list"], 0),
    // Uploads: a name the agent refuses (6) after authorization, in both
    // labs; an upload id that does not exist (5). `--resume` sends into an
    // upload without beginning one, so each method is the first called;
    // an empty file sends no chunk and goes straight to the commit.
    engine_case(
        "BeginUpload",
        &["engine", "upload", "@SPEC", "--as", ".hidden"],
        6,
    ),
    engine_case(
        "UploadChunk",
        &["engine", "upload", "@SPEC", "--resume", "0"],
        5,
    ),
    engine_case(
        "CommitUpload",
        &["engine", "upload", "@EMPTY", "--resume", "0"],
        5,
    ),
    engine_case("AbortUpload", &["engine", "upload-abort", "0"], 5),
    // Landlord-only: the tenant is refused by polkit, an outsider by the bus.
    case(
        H,
        "Report",
        LANDLORD,
        "landlordctl",
        &["health"],
        Setup::None,
    ),
    // Both roles; `attest` calls AttestationKey, then Attest. The pin file
    // is shared: root (the first column) pins the node, the others read it.
    case(
        A,
        "Attest",
        BOTH_ROLES,
        "tenantctl",
        &["attest", "--pin-file", "known_nodes"],
        Setup::None,
    ),
    case(
        A,
        "AttestationKey",
        BOTH_ROLES,
        "tenantctl",
        &["attest", "--pin-file", "known_nodes"],
        Setup::None,
    ),
];

/// Who receives a signal of the agent. Columns as in [`MATRIX`]: root,
/// landlord, tenant, outsider. The bus policy delivers each interface's
/// signals to its role only; the landlord's `KeysChanged` also reports
/// tenant key changes, so root needs no tenant signal.
pub struct SignalCase {
    pub interface: &'static str,
    pub member: &'static str,
    pub receive: [bool; 4],
}

/// Every signal the agent emits.
pub const SIGNALS: &[SignalCase] = &[
    SignalCase {
        interface: L,
        member: "KeysChanged",
        receive: [true, true, false, false],
    },
    SignalCase {
        interface: L,
        member: "BoundaryRestored",
        receive: [true, true, false, false],
    },
    SignalCase {
        interface: L,
        member: "BoundaryReverted",
        receive: [true, true, false, false],
    },
    SignalCase {
        interface: T,
        member: "KeysChanged",
        receive: [false, false, true, false],
    },
    SignalCase {
        interface: "org.leasehold.Health1",
        member: "FaultsChanged",
        receive: [true, true, false, false],
    },
];
