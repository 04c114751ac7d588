"""
``proxy.relay.ending``: a provider's close after it answered the client's
goodbye (SMTP 221 to QUIT, IMAP's tagged OK to LOGOUT) is the client's end;
any other close is the provider's.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from proxy.relay.ending import TAIL, endedBy, joinTail


class EndedByTests(SynchronousTestCase):
    def test_smtp(self):
        self.assertEqual(endedBy("smtp", b"250 OK\r\n221 2.0.0 Bye\r\n"), "client")
        self.assertEqual(endedBy("smtp", b"221-first\r\n221 2.0.0 Bye\r\n"), "client")
        self.assertEqual(endedBy("smtp", b"421 4.7.0 Too many invalid commands\r\n"), "provider")
        self.assertEqual(endedBy("smtp", b""), "provider")

    def test_imap(self):
        logout = b"* BYE Logging out\r\na3 OK Logout completed (0.001 + 0.000 secs).\r\n"
        self.assertEqual(endedBy("imap", logout), "client")
        self.assertEqual(endedBy("imap", b"* BYE Disconnected by an administrator\r\n"), "provider")
        self.assertEqual(endedBy("imap", b"a4 NO [LIMIT] too many\r\n"), "provider")
        self.assertEqual(endedBy("imap", b"+ go ahead\r\n"), "provider")

    def test_unknownProtocolOrCutLine(self):
        self.assertEqual(endedBy("other", b"221 Bye\r\n"), "provider")
        # The tail is a piece of one long line: its start is unknown.
        self.assertEqual(endedBy("imap", b"x OK " + b"y" * TAIL), "provider")

    def test_tailKept(self):
        """The tail is the last TAIL bytes across pieces, long and short."""
        tail = b""
        for piece in (b"a" * 1000, b"250 OK\r\n", b"221 Bye\r\n"):
            tail = joinTail(tail, piece)
        self.assertEqual(tail, (b"a" * 1000 + b"250 OK\r\n221 Bye\r\n")[-TAIL:])
        self.assertEqual(endedBy("smtp", tail), "client")
        # One long piece is cut to TAIL too, alone or after a short one.
        self.assertEqual(joinTail(b"", b"b" * 1000), b"b" * TAIL)
        self.assertEqual(joinTail(b"250 OK\r\n", b"c" * 1000), b"c" * TAIL)
