//! `handler = "convert"`: converts each order's amount to euros at the rate Redis holds for
//! its currency, appends the converted order to another stream and adds it to running
//! totals. The writes are effects, so they happen exactly once per order, with its
//! acknowledgement, however often the order is delivered.
//!
//! ```toml
//! [groups.convert]
//! stream = "{orders}"
//! handler = "convert"
//! [groups.convert.options]
//! output = "{orders}:eur"      # the converted orders (same hash slot as the stream)
//! totals = "{orders}:totals"   # a hash: `eur` and `orders`
//! rates = "rates"              # rates live at `rates:<CURRENCY>`, e.g. rates:USD = 0.92
//! ```
//!
//! What happens to an order:
//! - no `amount` or no `currency`, or an amount that is not a number: retrying cannot
//!   help, so [`HandlerError::Permanent`]: dead-lettered at once;
//! - no rate for its currency yet: rates arrive later, so [`HandlerError::Retry`]: retried
//!   after the group's backoff, dead-lettered once `max_deliveries` is reached;
//! - otherwise: converted.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use streamworker::{
    BuildError, Effect, Effects, Entry, Handler, HandlerContext, HandlerError, HandlerKind,
    HandlerOptions, Limits, OptionProblem, ResultExt, Store,
};

/// `[groups.<name>.options]` for `handler = "convert"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertOptions {
    /// The stream converted orders are appended to.
    pub output: String,
    /// The hash of running totals.
    pub totals: String,
    /// The prefix of the rate keys: the rate of USD is the string at `<rates>:USD`.
    #[serde(default = "default_rates")]
    pub rates: String,
}

fn default_rates() -> String {
    "rates".to_owned()
}

impl HandlerOptions for ConvertOptions {
    fn validate(&self, _limits: &Limits) -> Vec<OptionProblem> {
        let mut problems = Vec::new();
        if self.output.is_empty() {
            problems.push(OptionProblem::new("output", "must name a stream"));
        }
        if self.totals.is_empty() {
            problems.push(OptionProblem::new("totals", "must name a hash"));
        }
        problems
    }

    fn validate_with_stream(&self, stream: &str) -> Vec<OptionProblem> {
        if self.output == stream {
            vec![OptionProblem::new(
                "output",
                format!(
                    "= {:?} is the group's own stream: converted orders would be read again; name another stream",
                    self.output
                ),
            )]
        } else {
            Vec::new()
        }
    }

    // The XADD to `output` runs in the script that acknowledges the order: under Redis
    // Cluster, `check` makes sure it shares the stream's hash slot.
    fn acked_with(&self) -> Vec<(&'static str, &str)> {
        vec![("output", self.output.as_str())]
    }
}

/// The `convert` handler of one group.
pub struct Convert {
    options: ConvertOptions,
    store: Arc<dyn Store>,
}

impl HandlerKind for Convert {
    type Options = ConvertOptions;

    fn build(options: &ConvertOptions, context: &HandlerContext) -> Result<Self, BuildError> {
        Ok(Self {
            options: options.clone(),
            store: Arc::clone(&context.store),
        })
    }
}

impl Handler for Convert {
    async fn handle(&self, entry: &Entry) -> Result<Effects, HandlerError> {
        let amount = entry
            .get("amount")
            .ok_or_else(|| HandlerError::permanent("the order has no `amount`"))?;
        let amount: f64 = amount
            .trim()
            .parse()
            .map_err(|_| HandlerError::permanent(format!("amount {amount:?} is not a number")))?;
        let currency = entry
            .get("currency")
            .ok_or_else(|| HandlerError::permanent("the order has no `currency`"))?
            .to_uppercase();
        let rate = if currency == "EUR" {
            1.0
        } else {
            let key = format!("{}:{currency}", self.options.rates);
            // Redis unreachable: worth another try.
            let Some(rate) = self.store.get(key.clone()).await.retryable()? else {
                return Err(HandlerError::retry(format!(
                    "no exchange rate for {currency} yet ({key} is not set)"
                )));
            };
            rate.trim().parse::<f64>().permanent()?
        };
        let eur = (amount * rate * 100.0).round() / 100.0;
        Ok(vec![
            Effect::StreamAdd {
                key: self.options.output.clone(),
                fields: vec![
                    (
                        b"order".to_vec(),
                        entry.idempotency_id().to_string().into_bytes(),
                    ),
                    (b"eur".to_vec(), format!("{eur:.2}").into_bytes()),
                ],
                max_len: Some(1_000_000),
            },
            Effect::HashIncrFloat {
                key: self.options.totals.clone(),
                field: "eur".into(),
                by: eur,
            },
            Effect::HashIncr {
                key: self.options.totals.clone(),
                field: "orders".into(),
                by: 1,
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use streamworker::{EntryId, MemoryStore, Origin, Store};

    use super::*;

    fn order(fields: &[(&str, &str)]) -> Entry {
        let origin = Arc::new(Origin {
            stream: "{orders}".into(),
            group: "convert".into(),
            consumer: "test".into(),
        });
        let fields = fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        Entry::new(origin, EntryId::new(1, 0), 1, fields)
    }

    fn handler(store: &Arc<MemoryStore>) -> Convert {
        let options = ConvertOptions {
            output: "{orders}:eur".into(),
            totals: "{orders}:totals".into(),
            rates: "rates".into(),
        };
        let context = HandlerContext::new("{orders}", "convert", store.clone());
        Convert::build(&options, &context).unwrap()
    }

    #[tokio::test]
    async fn converts_at_the_stored_rate_and_counts_once_applied() {
        let store = Arc::new(MemoryStore::new());
        store
            .set("rates:USD".into(), "0.5".into(), None)
            .await
            .unwrap();
        let effects = handler(&store)
            .handle(&order(&[("amount", "30"), ("currency", "usd")]))
            .await
            .unwrap();
        // Nothing is written until the runtime applies the effects with the ack.
        assert!(store.hash("{orders}:totals").is_empty());
        store.commit(&effects).unwrap();
        assert_eq!(store.hash("{orders}:totals")["eur"], "15");
        assert_eq!(store.hash("{orders}:totals")["orders"], "1");
        assert_eq!(store.stream("{orders}:eur")[0][1].1, "15.00");
    }

    #[tokio::test]
    async fn a_missing_rate_is_retried_and_a_bad_amount_is_permanent() {
        let store = Arc::new(MemoryStore::new());
        let convert = handler(&store);
        let missing = convert
            .handle(&order(&[("amount", "1"), ("currency", "GBP")]))
            .await;
        assert!(matches!(missing, Err(HandlerError::Retry(ref r)) if r.contains("rates:GBP")));
        let bad = convert
            .handle(&order(&[("amount", "ten"), ("currency", "EUR")]))
            .await;
        assert!(matches!(bad, Err(HandlerError::Permanent(_))));
    }

    #[test]
    fn the_output_must_not_be_the_stream() {
        let options = ConvertOptions {
            output: "{orders}".into(),
            totals: "t".into(),
            rates: "rates".into(),
        };
        assert_eq!(options.validate_with_stream("{orders}")[0].key, "output");
    }
}
