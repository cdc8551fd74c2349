"""Refuse oversized uploads while they stream in, before they are kept anywhere."""

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile


class SizeLimitUploadHandler(FileUploadHandler):
    """Counts every file's bytes as they arrive and drops a file past the limit.

    It sits first in FILE_UPLOAD_HANDLERS, so the chunks of a file over the
    limit never reach the temporary-file handler behind it. The form reads
    `request.oversized_uploads` to tell the user which file was too big.
    """

    def new_file(self, field_name, *args, **kwargs):
        super().new_file(field_name, *args, **kwargs)
        self.received = 0
        self.limit = {
            "requirements_file": settings.SERVEML_MAX_REQUIREMENTS_BYTES,
            "csv_file": settings.SERVEML_MAX_CSV_BYTES,
        }.get(field_name, settings.SERVEML_MAX_UPLOAD_BYTES)

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > self.limit:
            oversized = getattr(self.request, "oversized_uploads", {})
            oversized[self.field_name] = self.limit
            self.request.oversized_uploads = oversized
            raise SkipFile()
        return raw_data

    def file_complete(self, file_size):
        return None
