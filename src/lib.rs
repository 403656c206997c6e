//! Mandate: a runtime authorization sidecar for AI agents and workloads.
//!
//! # Layout
//!
//! Dependencies point inward: the `api` adapters turn wire types into the core's types and
//! back; the core (`identity`, `policy`, `decision`) knows nothing of hyper or JSON bodies.
//!
//! - [`config`]: the TOML file plus `MANDATE_SECTION__KEY` overrides, parsed whole; every bad
//!   value is reported with its key path before start-up fails.
//! - [`strict_json`]: JSON for untrusted bytes (tokens, key sets, request bodies): duplicate
//!   keys refused at every depth, with the path to the duplicate; nesting bounded.
//! - [`identity`]: workload identity. Strict JWS parsing before any cryptography, trusted
//!   issuers with their JWKS (file or URL, refreshed in the background), SPIFFE / Kubernetes /
//!   OIDC profiles, and the verified-token cache that makes microsecond checks possible.
//! - [`policy`]: the Cedar policy bundle: load and validate, annotations (`@approval`, ...),
//!   per-action slices, the policy version, and the bundle's own test cases.
//! - [`decision`]: the engine that turns a verified principal, an action, a resource and a
//!   context into exactly one of allow, deny or escalate, failing closed.
//! - [`audit`]: the hash-chained JSON-lines log of every decision, and its offline verifier.
//! - [`approval`]: human approval, the core: requests, reviews, request-bound grants, the
//!   binding hash, and the `ApprovalStore` trait (no SQL).
//! - [`store`]: the `ApprovalStore` backends, SQLite and PostgreSQL: the only module with SQL.
//! - [`api`]: HTTP adapters: the native `/v1/check` API, AuthZEN 1.0, and admin endpoints.
//! - [`app`]: wiring: builds the state from the configuration and runs the listeners until
//!   shutdown.
//! - [`lockfile`]: one writer per data file (the audit log, a SQLite store): an exclusive
//!   lock held for the process lifetime, refused at start with the holder's pid.
//! - [`notify`]: outbound webhooks about approval requests, retried, never in the way.
//! - [`cli`]: the offline subcommands (`check`, `policy validate|test`, `dev token`).

pub mod api;
pub mod app;
pub mod approval;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod decision;
pub mod identity;
pub mod lockfile;
pub mod notify;
pub mod policy;
pub mod store;
pub mod strict_json;
pub mod telemetry;
