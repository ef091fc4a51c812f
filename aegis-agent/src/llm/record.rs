//! One JSON record per model API call.
pub struct CallRecord;
