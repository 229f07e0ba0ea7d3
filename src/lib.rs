//! anomalyclip-edge

pub mod camera;
