//! The one shape every bk-job number takes: an enum of the numbers fleetrun names, plus the
//! numbers it does not, serialized as the bare number.

/// A number no named variant has, as an enum's `Other` variant carries it.
///
/// Only `from_code` (and so reading a number) makes one, so `Other` never holds a number that
/// has a name: every value has one form, and `matches!` on a named variant sees it.
///
/// ```compile_fail
/// // Not from outside the crate: `Other(9)` would be `Success` in disguise.
/// let _ = fleetrun_api::HostStatus::Other(fleetrun_api::UnnamedCode(9));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnnamedCode(i32);

impl UnnamedCode {
    /// Made by the enums' `from_code` only, for a number none of their variants has.
    pub(crate) const fn new(code: i32) -> Self {
        Self(code)
    }

    /// The number.
    pub const fn get(self) -> i32 {
        self.0
    }
}

/// Declares a bk-job code enum: one variant per named number, and `Other` for any number
/// fleetrun gives no name, so that reading a stored or received number never fails and writing
/// it back gives the same number. Equality, hashing and order go by the number.
macro_rules! codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $code:literal => $label:literal,
            )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy)]
        pub enum $name {
            $(
                $(#[$vmeta])*
                $variant,
            )+
            /// A number fleetrun gives no name, kept as it was read. Made by
            /// [`Self::from_code`] only, for numbers no named variant has.
            Other($crate::codes::UnnamedCode),
        }

        impl $name {
            /// Every named value, by number.
            pub const NAMED: &'static [Self] = &[$(Self::$variant),+];

            /// The value for bk-job's number.
            pub const fn from_code(code: i32) -> Self {
                match code {
                    $($code => Self::$variant,)+
                    other => Self::Other($crate::codes::UnnamedCode::new(other)),
                }
            }

            /// bk-job's number.
            pub const fn code(self) -> i32 {
                match self {
                    $(Self::$variant => $code,)+
                    Self::Other(code) => code.get(),
                }
            }

            /// The operator's name for it; none for a number fleetrun does not name.
            pub const fn name(self) -> Option<&'static str> {
                match self {
                    $(Self::$variant => Some($label),)+
                    Self::Other(_) => None,
                }
            }

            /// Whether it is one of the [`Self::NAMED`] values.
            pub const fn is_named(self) -> bool {
                !matches!(self, Self::Other(_))
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.code() == other.code()
            }
        }

        impl Eq for $name {}

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.code().hash(state);
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.code().cmp(&other.code())
            }
        }

        impl From<i32> for $name {
            fn from(code: i32) -> Self {
                Self::from_code(code)
            }
        }

        impl From<$name> for i32 {
            fn from(value: $name) -> i32 {
                value.code()
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_i32(self.code())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                <i32 as serde::Deserialize>::deserialize(deserializer).map(Self::from_code)
            }
        }
    };
}

pub(crate) use codes;
