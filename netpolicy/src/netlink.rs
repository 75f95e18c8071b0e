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
const NFT_MSG_NEWSETELEM: u16 = 12;
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
        let (buf, mut pending) = encode(table, changes, self.seq);
        self.seq = self
            .seq
            .wrapping_add(u32::try_from(pending.len() + 2).unwrap_or(2));
        if pending.is_empty() {
            return Ok(());
        }
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
        self.sock.send(&buf, 0).map_err(|e| io("send", e))?;
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
