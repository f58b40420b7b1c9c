//! Estimated cost of a call, for models whose provider does not report it.

use std::collections::HashMap;

/// US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// Prices by model name. OpenRouter reports the real cost of each call, which wins; this
/// table covers other endpoints and answers without it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing(pub HashMap<String, Price>);

impl Default for Pricing {
    /// List prices of the default models at the time of writing.
    fn default() -> Self {
        let price = |input_per_million, output_per_million| Price {
            input_per_million,
            output_per_million,
        };
        Pricing(HashMap::from([
            (
                "meta-llama/llama-3.3-70b-instruct".to_owned(),
                price(0.59, 0.79),
            ),
            ("openai/gpt-4o-mini".to_owned(), price(0.15, 0.60)),
            ("anthropic/claude-3.5-sonnet".to_owned(), price(3.0, 15.0)),
        ]))
    }
}

impl Pricing {
    /// `None` for a model without a price: an unknown cost is not a zero cost.
    pub fn estimate(&self, model: &str, prompt_tokens: u32, completion_tokens: u32) -> Option<f64> {
        let price = self.0.get(model)?;
        Some(
            (f64::from(prompt_tokens) * price.input_per_million
                + f64::from(completion_tokens) * price.output_per_million)
                / 1_000_000.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_from_the_table() {
        let pricing = Pricing::default();
        let cost = pricing
            .estimate("openai/gpt-4o-mini", 1_000_000, 500_000)
            .unwrap();
        assert!((cost - 0.45).abs() < 1e-9, "{cost}");
        assert_eq!(pricing.estimate("unknown/model", 10, 10), None);
    }
}
