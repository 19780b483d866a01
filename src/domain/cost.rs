//! What a booking's machines cost: their running time (launch to termination, per instance
//! type) and, where `LABBOOK_PRICES` names a type's hourly price, an estimate in USD. An
//! estimate only: EC2 bills by the second after the first minute, adds storage and traffic,
//! and prices differ per Region and over time.

use std::collections::BTreeMap;

/// Hourly On-Demand prices per instance type (`LABBOOK_PRICES`, e.g.
/// `t3.small=0.0208,t3.medium=0.0416`, USD per hour).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices(BTreeMap<String, f64>);

impl Prices {
    /// Parses `TYPE=PRICE` pairs separated by commas; an empty text is no prices.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut prices = BTreeMap::new();
        for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, price) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not TYPE=PRICE (e.g. t3.small=0.0208)"))?;
            let (kind, price) = (kind.trim(), price.trim());
            let valid_type = !kind.is_empty()
                && kind
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            if !valid_type {
                return Err(format!("{kind:?} is not an instance type"));
            }
            let price: f64 = price
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && *p >= 0.0)
                .ok_or_else(|| {
                    format!("the price of {kind} ({price:?}) is not a number of USD per hour")
                })?;
            prices.insert(kind.to_owned(), price);
        }
        Ok(Self(prices))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The estimated cost in USD of `usage`, if every type in it has a price.
    pub fn estimate(&self, usage: &Usage) -> Option<f64> {
        if usage.seconds.is_empty() {
            return None;
        }
        usage
            .seconds
            .iter()
            .map(|(kind, seconds)| self.0.get(kind).map(|p| p * seconds / 3600.0))
            .sum::<Option<f64>>()
            .map(|usd| (usd * 10_000.0).round() / 10_000.0)
    }
}

/// The running time of a booking's machines, in seconds per instance type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub seconds: BTreeMap<String, f64>,
}

impl Usage {
    /// Every machine's running time, summed.
    pub fn machine_seconds(&self) -> u64 {
        self.seconds.values().sum::<f64>().round() as u64
    }

    /// Machine-hours, as operators read them.
    pub fn machine_hours(&self) -> f64 {
        self.machine_seconds() as f64 / 3600.0
    }

    /// Adds `other`'s running time to this one's (a total over bookings).
    pub fn add(&mut self, other: &Usage) {
        for (kind, seconds) in &other.seconds {
            *self.seconds.entry(kind.clone()).or_default() += seconds;
        }
    }
}

/// What machines ran for and, where the prices say, cost: one booking's (`labbook status`, the
/// console's booking page) or a list's total (the console's bookings list).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Cost {
    pub machine_seconds: u64,
    /// Rounded to hundredths.
    pub machine_hours: f64,
    /// USD; an estimate (see the module's notes). `None` where a type has no price.
    pub estimated_cost: Option<f64>,
}

impl Cost {
    pub fn of(usage: &Usage, prices: &Prices) -> Self {
        Self {
            machine_seconds: usage.machine_seconds(),
            machine_hours: (usage.machine_hours() * 100.0).round() / 100.0,
            estimated_cost: prices.estimate(usage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_and_estimate_only_what_they_name() {
        let prices = Prices::parse("t3.small=0.0208, t3.medium=0.0416").unwrap();
        let usage = Usage {
            seconds: [
                ("t3.small".to_owned(), 7200.0),
                ("t3.medium".to_owned(), 1800.0),
            ]
            .into(),
        };
        assert_eq!(usage.machine_seconds(), 9000);
        assert_eq!(prices.estimate(&usage), Some(0.0624));
        let unknown = Usage {
            seconds: [("m5.large".to_owned(), 3600.0)].into(),
        };
        assert_eq!(prices.estimate(&unknown), None, "no price, no estimate");
        assert_eq!(prices.estimate(&Usage::default()), None);
        assert!(Prices::parse("").unwrap().is_empty());
        for bad in [
            "t3.small",
            "t3.small=cheap",
            "=1",
            "t3.small=-1",
            "t3 small=1",
        ] {
            assert!(Prices::parse(bad).is_err(), "{bad}");
        }
    }
}
