//! The parts of the `marmot` daemon that are a library, so that fuzz targets and tools can
//! reach them: the configuration file and its checks, and what marmot asks of the
//! operating system.
#![warn(missing_docs)]

pub mod config;
pub mod platform;
