//! anomalyclip-edge
