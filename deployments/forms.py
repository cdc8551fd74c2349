from django import forms
from django.contrib.auth.forms import UserCreationForm
from django.template.defaultfilters import filesizeformat

from deployments import targets
from deployments.allowlist import allowed_packages
from deployments.inspection import InspectionError, scan_model_file
from deployments.models import Deployment
from deployments.requirements import RequirementsError, parse_requirements
from deployments.services import deployment_create, deployment_version_create, display_name


class DeploymentForm(forms.Form):
    """The upload, checked before anything is stored: a refused upload leaves nothing behind."""

    model_file = forms.FileField(
        label="Model file",
        help_text="model.pkl from pickle.dump, a joblib.dump file, or a .skops file (the safest format).",
        error_messages={"empty": "The model file is empty. Upload the file your training code saved."},
    )
    requirements_file = forms.FileField(
        label="requirements.txt",
        help_text="One package per line, pinned: scikit-learn==1.5.2. No options, URLs or paths.",
        error_messages={
            "empty": "requirements.txt is empty. List what the model needs, at least scikit-learn==<version>."
        },
    )
    name = forms.CharField(max_length=100, required=False, help_text="Optional; defaults to the model's file name.")
    target = forms.ChoiceField(choices=Deployment.Target.choices, initial=Deployment.Target.LOCAL, required=False)

    def __init__(self, *args, oversized: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.oversized = oversized or {}
        self.model_format = Deployment.Format.PICKLE

    def full_clean(self):
        super().full_clean()
        # A file over the limit was dropped while streaming; say so instead of "required".
        for field, limit in self.oversized.items():
            if field in self.fields:
                self._errors[field] = self.error_class(
                    [
                        f"This file is larger than the {filesizeformat(limit)} limit. Upload a smaller file "
                        "(an operator can raise SERVEML_MAX_UPLOAD_BYTES)."
                    ]
                )
                self.cleaned_data.pop(field, None)

    def clean_model_file(self):
        upload = self.cleaned_data["model_file"]
        if upload.size == 0:
            raise forms.ValidationError("The model file is empty. Upload the file your training code saved.")
        try:
            # Structure only (complete, well-formed, no hidden trailing payload);
            # the allowlist and versions are checked by the pipeline's inspect stage.
            self.model_format = scan_model_file(upload).format
        except InspectionError as exc:
            raise forms.ValidationError(str(exc)) from None
        finally:
            upload.seek(0)
        return upload

    def clean_requirements_file(self):
        upload = self.cleaned_data["requirements_file"]
        raw = upload.read()
        upload.seek(0)
        if not raw.strip():
            raise forms.ValidationError(
                "requirements.txt is empty. List what the model needs, at least scikit-learn==<version>."
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise forms.ValidationError("requirements.txt is not UTF-8 text. Upload the plain text file.") from None
        try:
            parse_requirements(text, allowed_packages=allowed_packages())
        except RequirementsError as exc:
            raise forms.ValidationError(str(exc)) from None
        return upload

    def clean_target(self):
        target = self.cleaned_data.get("target") or Deployment.Target.LOCAL
        if not targets.get(target).is_configured():
            raise forms.ValidationError(targets.get(target).not_configured)
        return target

    def clean_name(self):
        return self.cleaned_data.get("name", "").strip()

    def create_deployment(self, *, owner) -> Deployment:
        """Hand the validated upload to the service that stores it and queues the pipeline."""
        return deployment_create(
            owner=owner,
            name=self.deployment_name(),
            target=self.cleaned_data["target"],
            model_format=self.model_format,
            model_upload=self.cleaned_data["model_file"],
            requirements_upload=self.cleaned_data["requirements_file"],
        )

    def deployment_name(self) -> str:
        if self.cleaned_data.get("name"):
            return self.cleaned_data["name"]
        return display_name(self.cleaned_data["model_file"].name).rsplit(".", 1)[0][:100] or "model"


class VersionForm(DeploymentForm):
    """A new version of a deployment: the same files, checked the same way; its name and target are the deployment's."""

    PROMOTE_CHOICES = [
        ("auto", "Promote it as soon as it is ready"),
        ("review", "Let me review it first (promote it with a button)"),
    ]
    promote = forms.ChoiceField(choices=PROMOTE_CHOICES, initial="auto", required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.fields["name"], self.fields["target"]

    def clean_promote(self):
        return self.cleaned_data.get("promote") or "auto"

    def create_version(self, *, root: Deployment) -> Deployment:
        """Raises services.VersionRefused when the deployment takes no version now."""
        return deployment_version_create(
            root=root,
            model_format=self.model_format,
            model_upload=self.cleaned_data["model_file"],
            requirements_upload=self.cleaned_data["requirements_file"],
            auto_promote=self.cleaned_data["promote"] == "auto",
        )


class SignUpForm(UserCreationForm):
    pass
