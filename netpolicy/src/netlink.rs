//! Set-element changes sent straight to the kernel as one nfnetlink batch
//! (NEWSETELEM / DELSETELEM between BATCH_BEGIN and BATCH_END: one atomic
//! transaction), for the common one-peer change. The nft tool costs a
//! process and a cache load per change (≈5 ms to add, ≈15 ms to delete even
//! in a small set); the kernel's part is ≈0.1 ms. Only hash-set elements go
//! this way; everything else goes through `nft -f`.
//!
//! Message layout (include/uapi/linux/netfilter/nf_tables.h): nlmsghdr,
//! nfgenmsg, then NFTA_SET_ELEM_LIST_{TABLE,SET} and a nested
//! NFTA_SET_ELEM_LIST_ELEMENTS of NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY {
//! NFTA_DATA_VALUE = address bytes } }.

use std::net::IpAddr;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::nft::ApplyError;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_GETOBJ: u16 = 19;
/// NFTA_OBJ_TYPE of a counter object.
const NFT_OBJECT_COUNTER: u32 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_DONE: u16 = 3;
const ENOENT: i32 = 2;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NFPROTO_INET: u8 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;

/// Elements to add to or remove from one hash set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElemChange {
    /// Set name (in table `inet leasehold`).
    pub set: String,
    /// Add (true) or remove.
    pub add: bool,
    /// The addresses.
    pub addrs: Vec<IpAddr>,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align(buf.len()), 0);
}

/// Starts a nested attribute; returns where its length goes.
fn nest_start(buf: &mut Vec<u8>, ty: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(buf: &mut [u8], at: usize) {
    let len = u16::try_from(buf.len() - at).unwrap_or(u16::MAX);
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Appends one message (header, nfgenmsg, `body`).
fn message(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, body: &[u8]) {
    let len = 16 + 4 + body.len();
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(body);
}

/// Elements per message: the element list is one nested attribute, whose
/// length field has 16 bits (2048 IPv6 elements are 56 KiB).
const MESSAGE_ELEMENTS: usize = 2048;

/// The batch as bytes, and the sequence numbers that expect an answer
/// (numbered from `first_seq`). Large changes are split into several
/// messages of one batch, still one transaction.
pub fn encode(table: &str, changes: &[ElemChange], first_seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut buf = Vec::new();
    let mut seqs = Vec::new();
    let mut seq = first_seq;
    message(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for c in changes {
        for chunk in c.addrs.chunks(MESSAGE_ELEMENTS) {
            seq = seq.wrapping_add(1);
            let mut body = Vec::with_capacity(32 + chunk.len() * 28);
            attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
            attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(&c.set));
            let list = nest_start(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS);
            for a in chunk {
                let el = nest_start(&mut body, NFTA_LIST_ELEM);
                let key = nest_start(&mut body, NFTA_SET_ELEM_KEY);
                match a {
                    IpAddr::V4(v4) => attr(&mut body, NFTA_DATA_VALUE, &v4.octets()),
                    IpAddr::V6(v6) => attr(&mut body, NFTA_DATA_VALUE, &v6.octets()),
                }
                nest_end(&mut body, key);
                nest_end(&mut body, el);
            }
            nest_end(&mut body, list);
            let (ty, flags) = if c.add {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK)
            } else {
                (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
            };
            message(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | ty,
                flags,
                seq,
                NFPROTO_INET,
                0,
                &body,
            );
            seqs.push(seq);
        }
    }
    seq = seq.wrapping_add(1);
    message(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (buf, seqs)
}

fn io(what: &str, e: std::io::Error) -> ApplyError {
    ApplyError::Refused(format!("netlink {what}: {e}"))
}

/// A netfilter netlink socket kept open for the agent's lifetime. Kept
/// open on purpose: closing a netfilter socket makes the kernel wait for
/// the release of the last transaction's objects (`nft_rcv_nl_event`
/// flushes the destroy work, an RCU grace period: ≈10–15 ms on the test
/// VM after an element deletion), which a fresh socket per change pays on
/// every removal.
pub struct Conn {
    sock: Socket,
    seq: u32,
    sndbuf: usize,
}

impl Conn {
    /// Opens the socket in the caller's network namespace.
    pub fn open() -> Result<Conn, ApplyError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| io("socket", e))?;
        sock.bind_auto().map_err(|e| io("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| io("connect", e))?;
        // Never hang the agent on a kernel that does not answer.
        nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeval(Duration::from_secs(5)),
        )
        .map_err(|e| io("timeout", e.into()))?;
        Ok(Conn {
            sock,
            seq: 1,
            sndbuf: 0,
        })
    }

    /// Sends the changes as one transaction and waits for every answer. On
    /// an error the kernel has rolled the whole batch back.
    pub fn apply(&mut self, table: &str, changes: &[ElemChange]) -> Result<(), ApplyError> {
        let (buf, pending) = encode(table, changes, self.seq);
        self.seq = self
            .seq
            .wrapping_add(u32::try_from(pending.len() + 2).unwrap_or(2));
        if pending.is_empty() {
            return Ok(());
        }
        self.send_batch(&buf, pending)
    }

    fn send_batch(&mut self, buf: &[u8], mut pending: Vec<u32>) -> Result<(), ApplyError> {
        // A batch is one datagram: the send buffer must hold all of it (as
        // nft does, forced, since the agent has CAP_NET_ADMIN anyway).
        if buf.len() + 4096 > self.sndbuf {
            let want = buf.len() + 4096;
            nix::sys::socket::setsockopt(&self.sock, nix::sys::socket::sockopt::SndBufForce, &want)
                .or_else(|_| {
                    nix::sys::socket::setsockopt(
                        &self.sock,
                        nix::sys::socket::sockopt::SndBuf,
                        &want,
                    )
                })
                .map_err(|e| io("send buffer", e.into()))?;
            self.sndbuf = want;
        }
        self.sock.send(buf, 0).map_err(|e| io("send", e))?;
        let mut first_error: Option<String> = None;
        while !pending.is_empty() {
            let (data, _) = self.sock.recv_from_full().map_err(|e| io("receive", e))?;
            let mut at = 0;
            while at + 16 <= data.len() {
                let len =
                    u32::from_ne_bytes(data[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
                let ty = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
                let seq = u32::from_ne_bytes(data[at + 8..at + 12].try_into().unwrap_or([0; 4]));
                if len < 16 || at + len > data.len() {
                    break;
                }
                // Answers to an earlier, timed-out batch are skipped by seq.
                if ty == NLMSG_ERROR && len >= 20 && pending.contains(&seq) {
                    let code =
                        i32::from_ne_bytes(data[at + 16..at + 20].try_into().unwrap_or([0; 4]));
                    if code != 0 && first_error.is_none() {
                        first_error = Some(std::io::Error::from_raw_os_error(-code).to_string());
                    }
                    pending.retain(|s| *s != seq);
                }
                at += align(len);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(ApplyError::Refused(format!(
                "the kernel refused the element change (nothing changed): {e}"
            ))),
        }
    }
}

/// The attributes of a message or a nested attribute, as (type without
/// flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        v.push((ty, &b[4..len]));
        b = &b[align(len).min(b.len())..];
    }
    v
}

fn name_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(b)).into_owned()
}

/// The attributes of `types`, in order, as (type, length, payload) bytes:
/// what a listed object is, without handles, use counts and counters.
fn keep(payload: &[(u16, &[u8])], types: &[u16], out: &mut Vec<u8>) {
    for (ty, p) in payload.iter().filter(|(t, _)| types.contains(t)) {
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&u32::try_from(p.len()).unwrap_or(u32::MAX).to_ne_bytes());
        out.extend_from_slice(p);
    }
}

/// A rule's expressions without the state of `counter` expressions.
fn stateless_exprs(exprs: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (_, e) in attrs(exprs) {
        let a = attrs(e);
        let name = a
            .iter()
            .find(|(t, _)| *t == 1)
            .map(|(_, n)| *n)
            .unwrap_or(&[]);
        if name_of(name) == "counter" {
            keep(&a, &[1], &mut out);
        } else {
            keep(&a, &[1, 2], &mut out);
        }
    }
    out
}

/// The table's objects as the kernel has them, for comparing with an
/// earlier listing: each a name and a byte string of what defines it
/// (handles, use counts and counter values left out).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Objects {
    /// Chains: name, and type, hook, priority, policy, flags, userdata.
    pub chains: Vec<(String, Vec<u8>)>,
    /// Rules in order: the chain's name, and expressions and userdata.
    pub rules: Vec<(String, Vec<u8>)>,
    /// Sets: name, and flags, key type and length, size, userdata.
    pub sets: Vec<(String, Vec<u8>)>,
}

/// One set element as listed: the key as a number (network byte order),
/// and whether it ends an interval (interval sets store a range as its
/// first address and, flagged, the address after its last).
pub type ListedElem = (u128, bool);

impl Conn {
    /// One request; the payload (after the nfgenmsg) of every answer, or
    /// None when the kernel answers ENOENT. A dump interrupted by a
    /// concurrent change is repeated (up to 3 times).
    fn request(
        &mut self,
        ty: u16,
        flags: u16,
        body: &[u8],
    ) -> Result<Option<Vec<Vec<u8>>>, ApplyError> {
        for _ in 0..3 {
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            let mut buf = Vec::with_capacity(20 + body.len());
            message(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | ty,
                flags,
                seq,
                NFPROTO_INET,
                0,
                body,
            );
            self.sock.send(&buf, 0).map_err(|e| io("send", e))?;
            let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
            let mut out = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                let (data, _) = self.sock.recv_from_full().map_err(|e| io("receive", e))?;
                let mut at = 0;
                while at + 16 <= data.len() {
                    let len =
                        u32::from_ne_bytes(data[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
                    let mty = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
                    let mflags = u16::from_ne_bytes([data[at + 6], data[at + 7]]);
                    let mseq =
                        u32::from_ne_bytes(data[at + 8..at + 12].try_into().unwrap_or([0; 4]));
                    if len < 16 || at + len > data.len() {
                        break;
                    }
                    let msg = &data[at..at + len];
                    at += align(len);
                    if mseq != seq {
                        continue;
                    }
                    if mflags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match mty {
                        NLMSG_ERROR | NLMSG_DONE => {
                            let code = if len >= 20 {
                                i32::from_ne_bytes(msg[16..20].try_into().unwrap_or([0; 4]))
                            } else {
                                0
                            };
                            if code == -ENOENT {
                                return Ok(None);
                            }
                            if code != 0 {
                                return Err(ApplyError::Refused(format!(
                                    "netlink listing: {}",
                                    std::io::Error::from_raw_os_error(-code)
                                )));
                            }
                            if mty == NLMSG_DONE || !dump {
                                break 'recv;
                            }
                        }
                        _ => {
                            if len >= 20 {
                                out.push(msg[20..].to_vec());
                            }
                            if !dump && flags & NLM_F_ACK == 0 {
                                break 'recv;
                            }
                        }
                    }
                }
            }
            if !interrupted {
                return Ok(Some(out));
            }
        }
        Err(ApplyError::Refused(
            "netlink listing: interrupted by changes three times".to_owned(),
        ))
    }

    /// The ruleset generation: the kernel counts every committed nftables
    /// transaction of the namespace (NFT_MSG_GETGEN).
    pub fn generation(&mut self) -> Result<u32, ApplyError> {
        let answers = self
            .request(NFT_MSG_GETGEN, NLM_F_REQUEST | NLM_F_ACK, &[])?
            .unwrap_or_default();
        answers
            .iter()
            .flat_map(|a| attrs(a))
            .find(|(t, p)| *t == 1 && p.len() >= 4)
            .map(|(_, p)| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
            .ok_or_else(|| ApplyError::Refused("netlink: no generation in the answer".to_owned()))
    }

    /// Whether the table exists.
    pub fn table_exists(&mut self, table: &str) -> Result<bool, ApplyError> {
        let mut body = Vec::new();
        attr(&mut body, 1, &cstr(table)); // NFTA_TABLE_NAME
        Ok(self
            .request(NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK, &body)?
            .is_some())
    }

    /// Every object of `table` (see [`Objects`]); a dump per kind, about a
    /// millisecond, whatever the number of set elements.
    pub fn objects(&mut self, table: &str) -> Result<Objects, ApplyError> {
        let mut o = Objects::default();
        // (message, table attribute, name attribute, attributes kept)
        for (ty, t_attr, n_attr, kept) in [
            (NFT_MSG_GETCHAIN, 1u16, 3u16, &[4u16, 5, 7, 10, 12][..]),
            (NFT_MSG_GETRULE, 1, 2, &[7][..]),
            (NFT_MSG_GETSET, 1, 2, &[3, 4, 5, 9, 13][..]),
        ] {
            let mut body = Vec::new();
            attr(&mut body, t_attr, &cstr(table));
            let answers = self
                .request(ty, NLM_F_REQUEST | NLM_F_DUMP, &body)?
                .unwrap_or_default();
            for a in answers {
                let a = attrs(&a);
                let get = |t: u16| a.iter().find(|(x, _)| *x == t).map(|(_, p)| *p);
                if get(t_attr).map(name_of).as_deref() != Some(table) {
                    continue;
                }
                let name = get(n_attr).map(name_of).unwrap_or_default();
                let mut what = Vec::new();
                keep(&a, kept, &mut what);
                match ty {
                    NFT_MSG_GETCHAIN => o.chains.push((name, what)),
                    NFT_MSG_GETRULE => {
                        let ex = stateless_exprs(get(4).unwrap_or(&[]));
                        what.extend_from_slice(&ex);
                        o.rules.push((name, what));
                    }
                    _ => o.sets.push((name, what)),
                }
            }
        }
        Ok(o)
    }

    /// The elements of one set, or None when there is no such set.
    pub fn set_elements(
        &mut self,
        table: &str,
        set: &str,
    ) -> Result<Option<Vec<ListedElem>>, ApplyError> {
        let mut body = Vec::new();
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        let Some(answers) = self.request(NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, &body)?
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for a in answers {
            for (ty, list) in attrs(&a) {
                if ty != NFTA_SET_ELEM_LIST_ELEMENTS {
                    continue;
                }
                for (_, el) in attrs(list) {
                    let mut key = None;
                    let mut end = false;
                    for (t, p) in attrs(el) {
                        match t {
                            NFTA_SET_ELEM_KEY => {
                                key = attrs(p)
                                    .into_iter()
                                    .find(|(t, _)| *t == NFTA_DATA_VALUE)
                                    .map(|(_, v)| {
                                        v.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b))
                                    });
                            }
                            3 => {
                                // NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END
                                end = p.len() >= 4
                                    && u32::from_be_bytes(p[..4].try_into().unwrap_or([0; 4])) & 1
                                        != 0;
                            }
                            _ => {}
                        }
                    }
                    if let Some(k) = key {
                        out.push((k, end));
                    }
                }
            }
        }
        Ok(Some(out))
    }

    /// The table's named counter objects as (name, packets, bytes): one
    /// dump of the objects (NFT_MSG_GETOBJ, filtered to counters by the
    /// kernel), no rule or set element read. Empty when there is no
    /// table. At most `limit` are kept (the table is the agent's; more
    /// would be someone else's objects).
    pub fn counters(
        &mut self,
        table: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64, u64)>, ApplyError> {
        let mut body = Vec::new();
        attr(&mut body, 1, &cstr(table)); // NFTA_OBJ_TABLE
        attr(&mut body, 3, &NFT_OBJECT_COUNTER.to_be_bytes()); // NFTA_OBJ_TYPE
        let answers = self
            .request(NFT_MSG_GETOBJ, NLM_F_REQUEST | NLM_F_DUMP, &body)?
            .unwrap_or_default();
        let mut out = Vec::new();
        for a in answers {
            let a = attrs(&a);
            let get = |t: u16| a.iter().find(|(x, _)| *x == t).map(|(_, p)| *p);
            if get(1).map(name_of).as_deref() != Some(table)
                || get(3).map(|p| p.get(..4) == Some(&NFT_OBJECT_COUNTER.to_be_bytes()[..]))
                    != Some(true)
            {
                continue;
            }
            let (mut packets, mut bytes) = (0, 0);
            for (t, p) in attrs(get(4).unwrap_or(&[])) {
                let v = p
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_be_bytes);
                match t {
                    1 => bytes = v,   // NFTA_COUNTER_BYTES
                    2 => packets = v, // NFTA_COUNTER_PACKETS
                    _ => {}
                }
            }
            if out.len() < limit {
                out.push((get(2).map(name_of).unwrap_or_default(), packets, bytes));
            }
        }
        Ok(out)
    }

    /// Deletes sets (one transaction); absent sets make it fail.
    pub fn delete_sets(&mut self, table: &str, sets: &[String]) -> Result<(), ApplyError> {
        if sets.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut pending = Vec::new();
        let mut seq = self.seq.wrapping_add(1);
        message(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        for s in sets {
            seq = seq.wrapping_add(1);
            let mut body = Vec::new();
            attr(&mut body, 1, &cstr(table)); // NFTA_SET_TABLE
            attr(&mut body, 2, &cstr(s)); // NFTA_SET_NAME
            message(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSET,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                NFPROTO_INET,
                0,
                &body,
            );
            pending.push(seq);
        }
        seq = seq.wrapping_add(1);
        message(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.seq = seq;
        self.send_batch(&buf, pending)
    }
}

/// Sends the changes as one transaction on a socket of its own (see
/// [`Conn`] for why the agent keeps one open instead).
pub fn apply_elements(table: &str, changes: &[ElemChange]) -> Result<(), ApplyError> {
    Conn::open()?.apply(table, changes)
}

fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(
        i64::try_from(d.as_secs()).unwrap_or(5),
        i64::from(d.subsec_micros()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_nft_does() {
        // The DELSETELEM body nft 1.0.6 sends for `delete element inet t s
        // { 10.0.0.1 }` (seen with strace), with our table and set names.
        let (buf, seqs) = encode(
            "t",
            &[ElemChange {
                set: "s".into(),
                add: false,
                addrs: vec!["10.0.0.1".parse().unwrap()],
            }],
            1,
        );
        assert_eq!(seqs, vec![2]);
        let msg = &buf[20..76];
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 56);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), (10 << 8) | 14);
        assert_eq!(msg[16], NFPROTO_INET);
        assert_eq!(
            &msg[20..],
            b"\x06\x00\x01\x00t\x00\x00\x00\x06\x00\x02\x00s\x00\x00\x00\x14\x00\x03\x80\x10\x00\x01\x80\x0c\x00\x01\x80\x08\x00\x01\x00\x0a\x00\x00\x01"
        );
        assert_eq!(buf.len(), 20 + 56 + 20);
    }

    #[test]
    fn large_changes_are_split_into_messages_of_one_batch() {
        let addrs: Vec<IpAddr> = (0..5000u32)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let (buf, seqs) = encode(
            "t",
            &[ElemChange {
                set: "s".into(),
                add: true,
                addrs,
            }],
            7,
        );
        assert_eq!(seqs, vec![8, 9, 10]);
        // BATCH_BEGIN, three messages (2048 + 2048 + 904 elements of 16
        // bytes after a 36-byte head), BATCH_END.
        assert_eq!(buf.len(), 20 + 3 * (20 + 20) + 5000 * 16 + 20);
        let last = u32::from_ne_bytes(buf[buf.len() - 12..buf.len() - 8].try_into().unwrap());
        assert_eq!(last, 11);
    }
}
