//! The sandboxer's core: the backend traits, the sandbox and task registry,
//! containerd's Task API and Sandbox API, the ttrpc server, events, state
//! and live upgrade. Written once for every backend; it never asks which
//! kind it holds.

pub mod backend;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod events;
pub mod fdstore;
pub mod ids;
pub mod inspect;
pub mod recover;
pub mod rpc;
pub mod sandbox_api;
pub mod state;
pub mod task;
pub mod upgrade;
