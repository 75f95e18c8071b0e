//! Watching nftables commits: for each committed ruleset generation,
//! whether it touched Leasehold's table and which process committed it.
//!
//! The kernel announces every commit on the nftables netlink group
//! (`NFNLGRP_NFTABLES`, what `nft monitor` prints): one message per object
//! changed, each naming its family and table, then `NFT_MSG_NEWGEN` with
//! the generation, the committing pid and its name. A generation whose
//! messages never name the table cannot have changed it, whoever made it,
//! so the drift check need not read the table's sets back for it (see
//! [`crate::enforce::Enforcer::note_untouched`]); one that names it and is
//! not the agent's own commit is a change behind the agent's back.
//!
//! [`Listener`] reads the group itself: only headers and the table
//! attribute are decoded (a 100k-host apply is megabytes of elements, which
//! `nft monitor` would format as text in a process of its own).

use std::os::fd::AsRawFd;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

/// One committed generation as `nft monitor` reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The ruleset generation the commit produced.
    pub gen: u32,
    /// The committing process (absent when nft could not tell).
    pub pid: Option<u32>,
    /// Its command name, as nft printed it.
    pub comm: Option<String>,
    /// The first change of this generation that named the table, described
    /// (at most [`MAX_LINE`] bytes); None: the table was not touched.
    pub touched: Option<String>,
}

/// Bytes kept of the description of what touched the table.
pub const MAX_LINE: usize = 200;

/// What the [`Listener`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A commit.
    Generation(Generation),
    /// The socket overflowed and notifications were lost: the generation
    /// being read is reported as touching the table (it may have).
    Lost,
}

// nfnetlink: subsystem in the high byte of the message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFNLGRP_NFTABLES: u32 = 7;
const NFPROTO_INET: u8 = 1;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// Socket receive buffer: a full apply's notifications arrive in a burst.
const RCVBUF: usize = 8 << 20;

/// A netlink socket on the nftables notification group of the caller's
/// network namespace.
#[derive(Debug)]
pub struct Listener {
    sock: Socket,
    buf: Vec<u8>,
    decoder: Decoder,
}

/// Turns notification datagrams into [`Event`]s.
#[derive(Debug)]
struct Decoder {
    table: Vec<u8>,
    touched: Option<String>,
    queue: std::collections::VecDeque<Event>,
}

impl Listener {
    /// Subscribes to the group, watching the `inet` table named `table`.
    /// Notifications of commits from then on are reported.
    pub fn open(table: &str) -> std::io::Result<Listener> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.add_membership(NFNLGRP_NFTABLES)?;
        // Root may exceed rmem_max; otherwise the plain option (capped).
        if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF)
            .is_err()
        {
            sock.set_rx_buf_sz(RCVBUF)?;
        }
        Ok(Listener {
            sock,
            buf: vec![0; 256 * 1024],
            decoder: Decoder::new(table),
        })
    }

    /// Blocks until the next event.
    pub fn wait(&mut self) -> std::io::Result<Event> {
        loop {
            if let Some(e) = self.decoder.queue.pop_front() {
                return Ok(e);
            }
            let n = match nix::sys::socket::recv(
                self.sock.as_raw_fd(),
                &mut self.buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::ENOBUFS) => {
                    self.decoder
                        .touched
                        .get_or_insert_with(|| "notifications lost".to_owned());
                    return Ok(Event::Lost);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            self.decoder.feed(&self.buf[..n]);
        }
    }
}

impl Decoder {
    fn new(table: &str) -> Decoder {
        Decoder {
            table: table.as_bytes().to_vec(),
            touched: None,
            queue: std::collections::VecDeque::new(),
        }
    }

    /// Decodes one datagram of notifications into the queue.
    fn feed(&mut self, mut b: &[u8]) {
        while b.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if len < NLMSG_HDRLEN || len > b.len() {
                break;
            }
            let ty = u16::from_ne_bytes([b[4], b[5]]);
            let msg = &b[NLMSG_HDRLEN..len];
            if ty >> 8 == NFNL_SUBSYS_NFTABLES && msg.len() >= NFGENMSG_LEN {
                let family = msg[0];
                let attrs = attributes(&msg[NFGENMSG_LEN..]);
                if ty & 0xff == NFT_MSG_NEWGEN {
                    let get = |t: u16| attrs.iter().find(|(at, _)| *at == t).map(|(_, v)| *v);
                    let be32 = |v: &[u8]| {
                        v.get(..4)
                            .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
                    };
                    if let Some(gen) = get(1).and_then(be32) {
                        let comm = get(3).map(|v| {
                            String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap_or(v))
                                .into_owned()
                        });
                        self.queue.push_back(Event::Generation(Generation {
                            gen,
                            pid: get(2).and_then(be32),
                            comm,
                            touched: self.touched.take(),
                        }));
                    }
                } else if family == NFPROTO_INET && self.touched.is_none() {
                    // Attribute 1 is the table's name in every nftables
                    // object message (table, chain, rule, set, element,
                    // object, flowtable).
                    let name = |t: u16| {
                        attrs
                            .iter()
                            .find(|(at, _)| *at == t)
                            .map(|(_, v)| v.split(|c| *c == 0).next().unwrap_or(v))
                    };
                    if name(1) == Some(self.table.as_slice()) {
                        self.touched = Some(describe(ty & 0xff, &name));
                    }
                }
            }
            let step = (len + 3) & !3;
            if step >= b.len() {
                break;
            }
            b = &b[step..];
        }
    }
}

/// The attributes of a netlink message body: (type, payload).
fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        // Without the nested and byte-order flags.
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        let step = (len + 3) & !3;
        if step >= b.len() {
            break;
        }
        b = &b[step..];
    }
    out
}

/// A short description of an object change, like `nft monitor`'s verbs.
fn describe<'a>(msg: u16, name: &dyn Fn(u16) -> Option<&'a [u8]>) -> String {
    let s = |t: u16| name(t).map(|v| String::from_utf8_lossy(v).into_owned());
    let (verb, what, attr) = match msg {
        0 => ("add", "table", 0),
        2 => ("delete", "table", 0),
        3 => ("add", "chain", 3),
        5 => ("delete", "chain", 3),
        6 => ("add", "rule in chain", 2),
        8 => ("delete", "rule in chain", 2),
        9 => ("add", "set", 2),
        11 => ("delete", "set", 2),
        12 => ("add", "elements to set", 2),
        14 => ("delete", "elements from set", 2),
        18 => ("add", "object", 2),
        20 => ("delete", "object", 2),
        _ => ("change", "object", 2),
    };
    let mut d = format!("{verb} {what}");
    if attr != 0 {
        if let Some(n) = s(attr) {
            d.push(' ');
            d.push_str(&n);
        }
    }
    let mut end = d.len().min(MAX_LINE);
    while !d.is_char_boundary(end) {
        end -= 1;
    }
    d.truncate(end);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One nftables notification as the kernel frames it.
    fn message(msg: u16, family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for (t, v) in attrs {
            let len = 4 + v.len();
            body.extend_from_slice(&u16::try_from(len).unwrap().to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = Vec::new();
        m.extend_from_slice(
            &u32::try_from(NLMSG_HDRLEN + body.len())
                .unwrap()
                .to_ne_bytes(),
        );
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    fn newgen(gen: u32, pid: u32, comm: &str) -> Vec<u8> {
        let mut name = comm.as_bytes().to_vec();
        name.push(0);
        message(
            NFT_MSG_NEWGEN,
            0,
            &[(1, &gen.to_be_bytes()), (2, &pid.to_be_bytes()), (3, &name)],
        )
    }

    fn events(l: &mut Decoder, datagram: &[u8]) -> Vec<Event> {
        l.feed(datagram);
        l.queue.drain(..).collect()
    }

    #[test]
    fn generations_say_who_and_whether_the_table_was_touched() {
        let mut l = Decoder::new("leasehold");
        let mut d = message(0, 2, &[(1, b"other\0")]);
        d.extend(newgen(5, 17829, "nft"));
        // Another family's table of the same name is another table.
        d.extend(message(12, 2, &[(1, b"leasehold\0"), (2, b"s\0")]));
        d.extend(newgen(6, 1, "nft"));
        d.extend(message(12, 1, &[(1, b"leasehold\0"), (2, b"lla0_h4_g2\0")]));
        d.extend(message(2, 1, &[(1, b"leasehold\0")]));
        d.extend(newgen(7, 42, "agentd"));
        let ev = events(&mut l, &d);
        let gens: Vec<Generation> = ev
            .into_iter()
            .map(|e| match e {
                Event::Generation(g) => g,
                Event::Lost => panic!("lost"),
            })
            .collect();
        assert_eq!(gens.len(), 3);
        assert_eq!(
            gens[0],
            Generation {
                gen: 5,
                pid: Some(17829),
                comm: Some("nft".into()),
                touched: None
            }
        );
        assert_eq!(gens[1].touched, None);
        // The first change naming the table is the one described.
        assert_eq!(
            gens[2].touched.as_deref(),
            Some("add elements to set lla0_h4_g2")
        );
        assert_eq!(gens[2].comm.as_deref(), Some("agentd"));
    }

    #[test]
    fn a_table_named_like_ours_is_not_ours_and_truncated_input_is_no_event() {
        let mut l = Decoder::new("leasehold");
        let mut d = message(0, 1, &[(1, b"leasehold2\0")]);
        d.extend(newgen(9, 1, "nft"));
        let ev = events(&mut l, &d);
        assert!(matches!(&ev[..], [Event::Generation(g)] if g.touched.is_none()));
        // A datagram cut inside a message: what is whole is read, the rest
        // dropped, nothing panics.
        let mut d = message(3, 1, &[(1, b"leasehold\0"), (3, b"landlord_in\0")]);
        let g = newgen(10, 1, "nft");
        d.extend_from_slice(&g[..g.len() - 3]);
        assert!(events(&mut l, &d).is_empty());
        let ev = events(&mut l, &newgen(11, 1, "nft"));
        assert!(
            matches!(&ev[..], [Event::Generation(g)] if g.touched.as_deref() == Some("add chain landlord_in"))
        );
        for cut in 0..40 {
            let d = message(12, 1, &[(1, b"leasehold\0"), (2, b"s\0")]);
            let _ = events(&mut l, &d[..cut.min(d.len())]);
        }
    }
}
