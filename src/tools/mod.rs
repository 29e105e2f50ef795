//! The tools around the daemon: they start it, feed it and measure it, and never run inside
//! `streamworker run`. Like the daemon, they speak to Redis only through [`crate::client`].
//!
//! - [`produce`]: `streamworker produce`, the seed scenarios' events at a rate;
//! - [`demo`]: `streamworker demo`, the built-in groups against a private Redis;
//! - [`bench`](mod@bench): `streamworker bench` and `bench-contender`, streamworker against the loops
//!   people write by hand;
//! - [`local_redis`]: a private `redis-server` on a free port, for `demo` and `bench`.

pub mod bench;
pub mod demo;
pub mod local_redis;
pub mod produce;
