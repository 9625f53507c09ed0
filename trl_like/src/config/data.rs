//! `DataArguments`: the tutorial's `DataTrainingArguments` (which data files
//! to read, in what shape, and how much to hold out for evaluation).

use super::{ConfigError, ConfigGroup, ConfigValue, FieldSpec, FieldType, ValueKind};
pub use crate::data::DatasetFormat;

impl ConfigValue for DatasetFormat {
    // `tokenized` is only ever detected, never asked for.
    const TYPE: FieldType = FieldType::required(ValueKind::Enum(DatasetFormat::CHOICES));
}

config_struct! {
    /// Which data to train on: the tutorial's `DataTrainingArguments`.
    /// `Default` has no data files; the application or the user names them.
    pub struct DataArguments {
        /// One or more JSON / JSON Lines files, or a Hub dataset id.
        data_files: Vec<String> = Vec::new(),
        /// Record layout of the data files.
        dataset_format: DatasetFormat = DatasetFormat::Auto,
        /// Held-out evaluation split: a fraction in (0, 1) (the tutorial's train_test_split(0.05)),
        /// a whole number of records (>= 1), or 0 for no split.
        test_size: f64 = 0.05,
        /// Use at most this many records (before the split); unset uses all.
        max_samples: Option<usize> = None,
        /// Skip records that do not fit dataset_format (with a warning) instead of failing.
        skip_bad_records: bool = false,
    }
}

impl DataArguments {
    /// `(train, test)` sizes for `n` records, as `datasets`'
    /// `train_test_split(test_size)` computes them: a fraction gives
    /// `ceil(test_size * n)` test records, a whole number that many; 0 gives
    /// no test split.
    pub fn split_sizes(&self, n: usize) -> Result<(usize, usize), ConfigError> {
        let t = self.test_size;
        if t == 0.0 {
            return Ok((n, 0));
        }
        let n_test = if t < 1.0 {
            (t * n as f64).ceil() as usize
        } else {
            t as usize
        };
        if n_test >= n {
            return Err(ConfigError::invalid(
                "test_size",
                format!("leaves no training records: {n_test} of {n} records would be held out"),
            ));
        }
        if n_test == 0 {
            return Err(ConfigError::invalid(
                "test_size",
                format!("gives an empty test split for {n} records"),
            ));
        }
        Ok((n - n_test, n_test))
    }

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_files.iter().any(|f| f.trim().is_empty()) {
            return Err(ConfigError::invalid("data_files", "contains an empty path"));
        }
        let t = self.test_size;
        if !t.is_finite() || t < 0.0 {
            return Err(ConfigError::invalid(
                "test_size",
                format!("must be >= 0, got {t}"),
            ));
        }
        if t >= 1.0 && t.fract() != 0.0 {
            return Err(ConfigError::invalid(
                "test_size",
                format!("must be a fraction in (0, 1) or a whole number of records, got {t}"),
            ));
        }
        if self.max_samples == Some(0) {
            return Err(ConfigError::invalid(
                "max_samples",
                "must be >= 1 (or unset for all records)",
            ));
        }
        Ok(())
    }
}

impl ConfigGroup for DataArguments {
    const NAME: &'static str = "DataArguments";
    const TITLE: &'static str = "Data arguments (DataArguments)";

    fn fields() -> &'static [FieldSpec] {
        Self::FIELDS
    }

    fn validate(&self) -> Result<(), ConfigError> {
        DataArguments::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizes_follow_datasets() {
        // datasets 5.2: n_test = ceil(test_size * n), n_train = n - n_test.
        let d = DataArguments::default();
        assert_eq!(d.split_sizes(1000).unwrap(), (950, 50));
        assert_eq!(d.split_sizes(42677).unwrap(), (40543, 2134)); // ceil(2133.85)
        assert_eq!(d.split_sizes(10).unwrap(), (9, 1)); // ceil(0.5)
        let d = DataArguments {
            test_size: 100.0,
            ..Default::default()
        };
        assert_eq!(d.split_sizes(1000).unwrap(), (900, 100));
        assert!(d.split_sizes(100).is_err());
        let d = DataArguments {
            test_size: 0.0,
            ..Default::default()
        };
        assert_eq!(d.split_sizes(7).unwrap(), (7, 0));
    }

    #[test]
    fn validation() {
        assert_eq!(DataArguments::default().validate(), Ok(()));
        let d = DataArguments {
            test_size: 1.5,
            ..Default::default()
        };
        assert_eq!(d.validate().unwrap_err().field(), "test_size");
        let d = DataArguments {
            test_size: -0.1,
            ..Default::default()
        };
        assert_eq!(d.validate().unwrap_err().field(), "test_size");
        let d = DataArguments {
            max_samples: Some(0),
            ..Default::default()
        };
        assert_eq!(d.validate().unwrap_err().field(), "max_samples");
    }
}
