//! What an [`Effect`] means in Redis. A handler describes its writes; this is the one place
//! that turns the description into a command, for `ack_effects.lua`, the large-settlement
//! MULTI and `Store::apply` alike.

use streamworker_handlers::Effect;

/// The command name and its arguments for one effect.
pub(crate) fn command(effect: &Effect) -> (&'static str, Vec<Vec<u8>>) {
    fn s(v: &str) -> Vec<u8> {
        v.as_bytes().to_vec()
    }
    match effect {
        Effect::HashIncr { key, field, by } => {
            ("HINCRBY", vec![s(key), s(field), s(&by.to_string())])
        }
        Effect::HashIncrFloat { key, field, by } => (
            "HINCRBYFLOAT",
            vec![s(key), s(field), s(&format_float(*by))],
        ),
        Effect::HashSet { key, field, value } => ("HSET", vec![s(key), s(field), s(value)]),
        Effect::Expire { key, ttl } => (
            "PEXPIRE",
            vec![s(key), s(&ttl.as_millis().max(1).to_string())],
        ),
        Effect::StreamAdd {
            key,
            fields,
            max_len,
        } => {
            let mut args = vec![s(key)];
            if let Some(n) = max_len {
                args.extend([s("MAXLEN"), s("~"), s(&n.to_string())]);
            }
            args.push(s("*"));
            for (k, v) in fields {
                args.push(k.clone());
                args.push(v.clone());
            }
            ("XADD", args)
        }
        Effect::Publish { channel, message } => ("PUBLISH", vec![s(channel), s(message)]),
        // Applied on its own before the acknowledgement (`Client::ack_with_effects`).
        Effect::StreamAddAt { key, id, fields } => {
            let mut args = vec![s(key), s(&id.to_string())];
            for (k, v) in fields {
                args.push(k.clone());
                args.push(v.clone());
            }
            ("XADD", args)
        }
    }
}

/// Floats as Redis reads them back: no exponent, no trailing noise.
fn format_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        let text = format!("{x:.12}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_become_commands() {
        let (name, args) = command(&Effect::HashIncrFloat {
            key: "k".into(),
            field: "f".into(),
            by: 0.0023,
        });
        assert_eq!(name, "HINCRBYFLOAT");
        assert_eq!(args[2], b"0.0023");
        let (name, args) = command(&Effect::StreamAdd {
            key: "out".into(),
            fields: vec![(b"a".to_vec(), b"1".to_vec())],
            max_len: Some(100),
        });
        assert_eq!(name, "XADD");
        assert_eq!(
            args,
            vec![
                b"out".to_vec(),
                b"MAXLEN".to_vec(),
                b"~".to_vec(),
                b"100".to_vec(),
                b"*".to_vec(),
                b"a".to_vec(),
                b"1".to_vec()
            ]
        );
        assert_eq!(format_float(3.0), "3");
    }
}
