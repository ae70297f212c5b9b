"""The tests' S3 endpoint: moto's server with AWS's limit on copies inside the store, scaled down.

AWS refuses a CopyObject whose source is above 5 GiB ("The specified copy source is larger than the maximum
allowable size for a copy source"); moto copies anything. Here the limit is $S3_COPY_LIMIT bytes (conftest: 1 MiB,
below the tiny models' 2-3 MB of weights), so code that copies model weights inside a bucket fails in the tests as
it would on AWS with a 7B model. Run as `python tests/s3_server.py -H HOST -p PORT` (moto.server's arguments).
"""

import os

from moto.s3.exceptions import S3ClientError
from moto.s3.models import S3Backend
from moto.server import main

LIMIT = int(os.environ.get("S3_COPY_LIMIT", 5 * 2**30))
_copy_object = S3Backend.copy_object


def copy_object(self, src_key, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 (moto's signature)
    """moto's CopyObject, refused above LIMIT as AWS refuses it above 5 GiB."""
    if src_key.size > LIMIT:
        raise S3ClientError(
            "InvalidRequest",
            f"The specified copy source is larger than the maximum allowable size for a copy source: {LIMIT}",
        )
    return _copy_object(self, src_key, *args, **kwargs)


S3Backend.copy_object = copy_object

if __name__ == "__main__":
    main()
