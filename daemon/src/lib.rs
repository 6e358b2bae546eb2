//! The parts of the `marmot` daemon that are a library, so that fuzz targets and tools can
//! reach them: the configuration file and its checks.
#![warn(missing_docs)]

pub mod config;
