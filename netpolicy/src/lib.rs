//! Leasehold network policy (R3, R4, R18): the landlord's cluster boundary
//! and the tenant's sub-boundary. A boundary is a default-deny list of allow
//! entries over peers (CIDRs or named groups) × direction × protocol ×
//! ports. A sub-boundary must lie inside the cluster boundary: [`excess`]
//! names what sticks out, [`narrow`] computes the intersection, [`explain`]
//! says which entry of which boundary decides a flow.
//!
//! The model and check are pure logic; [`nft`] writes the nftables
//! transactions and [`enforce`] keeps the kernel's table as desired.

#![warn(missing_docs)]

pub mod check;
pub mod conntrack;
pub mod doc;
pub mod enforce;
pub mod model;
pub mod monitor;
pub mod netlink;
pub mod nft;
pub mod policy;
pub mod ranges;

pub use check::{excess, explain, narrow, Excess, Explanation, Flow};
pub use model::{Action, Boundary, BoundaryDoc, Direction, DocError, Proto};
