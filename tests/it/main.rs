//! Integration tests: the built binary against real `redis-server` processes started on
//! free ports. One test binary, modules by area, a `support` helper.

// What every test binary shares (free ports, files, processes); `support` builds on it.
#[path = "../common/mod.rs"]
mod common;
mod support;

mod admin_cli;
mod alerts;
mod analytics;
mod bench;
mod chaos;
mod cli;
mod cli_more;
mod console;
mod defaults;
mod delivery;
mod demo;
mod failures;
mod faults;
mod forward;
mod gaps;
mod huge;
mod inprocess;
mod learning;
mod observability;
mod operate;
mod ops_guards;
mod ordering;
mod partitions;
mod pause;
mod pg_tls;
mod promises;
mod scenarios;
mod shutdown;
mod tls_reader;
mod topology;
mod warehouse;
