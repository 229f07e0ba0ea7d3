//! anomalyclip-edge

pub mod eval;
