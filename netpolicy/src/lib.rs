//! Leasehold network policy (R3, R4, R18): the landlord's cluster boundary
//! and the tenant's sub-boundary. A boundary is a default-deny list of allow
//! entries over peers (CIDRs or named groups) × direction × protocol ×
//! ports. A sub-boundary must lie inside the cluster boundary: [`excess`]
//! names what sticks out, [`narrow`] computes the intersection, [`explain`]
//! says which entry of which boundary decides a flow.
//!
//! This crate is pure logic; the nftables backend comes next (issue 5).

#![warn(missing_docs)]

pub mod check;
pub mod model;
pub mod nft;
pub mod ranges;

pub use check::{excess, explain, narrow, Excess, Explanation, Flow};
pub use model::{Action, Boundary, BoundaryDoc, Direction, DocError, Proto};
