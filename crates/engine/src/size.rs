//! Byte sizes as users write them. "20G" and "20GiB" both mean 20 GiB: a cache
//! size is memory, and memory is counted in powers of two. Only the explicit
//! SI forms ("20GB") are decimal.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size: write it like 512MiB, 20GiB or 20G"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            other => {
                return Err(format!(
                "'{s}': unknown unit '{other}' (use B, KiB, MiB, GiB, TiB; K/M/G/T mean the same)"
            ))
            }
        };
        Ok(ByteSize((num * mult as f64).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, unit) in UNITS {
            if self.0 >= unit {
                let v = self.0 as f64 / unit as f64;
                return if self.0.is_multiple_of(unit) {
                    write!(f, "{}{name}", self.0 / unit)
                } else {
                    write!(f, "{v:.2}{name}")
                };
            }
        }
        write!(f, "{}B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn binary_by_default_decimal_when_asked() {
        assert_eq!("20G".parse::<ByteSize>().unwrap().0, 20 << 30);
        assert_eq!("20GiB".parse::<ByteSize>().unwrap().0, 20 << 30);
        assert_eq!("8MiB".parse::<ByteSize>().unwrap().0, 8 << 20);
        assert_eq!("1.5G".parse::<ByteSize>().unwrap().0, 3 << 29);
        assert_eq!("20GB".parse::<ByteSize>().unwrap().0, 20_000_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("3 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn prints_binary_units() {
        assert_eq!(ByteSize(20 << 30).to_string(), "20GiB");
        assert_eq!(ByteSize(3 << 19).to_string(), "1.50MiB");
        assert_eq!(ByteSize(12).to_string(), "12B");
    }
}
