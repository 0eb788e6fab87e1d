//! Traffic steering to POPs: whether this POP takes traffic, decided once
//! and carried out twice — by anycast (the BGP speaker in `crate::bgp`
//! announces or withdraws) and by GeoDNS (this POP's row of the replicated
//! `pops` table says whether it is drained and whether it can serve; every
//! POP's GeoDNS reads it).
//!
//! - [`verdict`]: can this POP serve? (pure: snapshot and running
//!   listeners in, verdict out) and what it wants announced.
//! - [`pop_row`]: this POP's `draining` / `serving` columns.
//! - [`controller`]: the task that judges and carries out, the operator's
//!   drain, the shutdown's withdrawal.
//! - [`status`], [`api`], [`cli`]: `GET /api/v1/pop`, `POST
//!   /api/v1/pop/drain|undrain`, `edgeproxy drain|undrain|pop status`.

pub mod api;
pub mod cli;
pub mod controller;
pub mod pop_row;
pub mod status;
pub mod verdict;

pub use controller::{start, Handle};
