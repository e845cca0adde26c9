"""S3 locations (``s3://bucket/prefix``): parsed and told apart from other store locations without
importing boto3, so processes that use no S3 store never load it."""

from __future__ import annotations

from dataclasses import dataclass

from inferq.shared.errors import StoreError

SCHEME = "s3://"


@dataclass(frozen=True, slots=True)
class S3Location:
    """``s3://bucket/prefix`` split into a bucket and a key prefix ("" or ending in "/")."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, location: str) -> S3Location:
        """Parse ``s3://bucket[/prefix]``; raises :class:`StoreError` when malformed."""
        if not location.startswith(SCHEME):
            raise StoreError(f"{location!r} is not an s3:// location")
        bucket, _, prefix = location[len(SCHEME) :].partition("/")
        if not bucket:
            raise StoreError(f"{location!r} names no bucket: use s3://bucket/prefix")
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise StoreError(f"{location!r}: '.' and '..' are not allowed in the prefix")
        return cls(bucket, "".join(f"{p}/" for p in parts))

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` under the prefix."""
        return self.prefix + "/".join(parts)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"


def is_s3(location: str) -> bool:
    """True when ``location`` names an S3 store."""
    return location.startswith(SCHEME)
