//! The loop a Rust engineer would hand-write with redis-rs, for `streamworker bench`:
//! XREADGROUP COUNT 512 with the typed reply, then one XACK per batch, one after the other.

use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};

pub async fn hand_written_loop(
    url: &str,
    stream: &str,
    group: &str,
    consumer: &str,
) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
    let mut con = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let options = StreamReadOptions::default()
        .group(group, consumer)
        .count(512)
        .block(1000);
    loop {
        let reply: StreamReadReply = con.xread_options(&[stream], &[">"], &options).await?;
        let ids: Vec<String> = reply
            .keys
            .iter()
            .flat_map(|key| key.ids.iter().map(|entry| entry.id.clone()))
            .collect();
        if !ids.is_empty() {
            let _: u64 = con.xack(stream, group, &ids).await?;
        }
    }
}
