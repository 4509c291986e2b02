"""The built-in route actions, published the way a third party's would be."""

from dcrouter.actions.block import BlockAction
from dcrouter.actions.forward import ForwardAction
from dcrouter.actions.http import HTTPAction
from dcrouter.actions.redirect import RedirectAction
from dcrouter.actions.smtp_starttls import SMTPStartTLSAction
from dcrouter.actions.static import StaticAction

forward = ForwardAction()
block = BlockAction()
static = StaticAction()
http = HTTPAction()
redirect = RedirectAction()
smtpStarttls = SMTPStartTLSAction()
