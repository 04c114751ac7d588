from twisted.application.service import ServiceMaker

imapproxy = ServiceMaker(
    "imapproxy",
    "proxy.tap",
    "IMAP proxy that logs in to OAuth2-only providers (XOAUTH2) for password clients",
    "imapproxy",
)
